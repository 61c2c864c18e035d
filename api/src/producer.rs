//! The request producer now lives in core
//! ([`couponrush_core::producer`]): the api and `coupon-loadgen run
//! --direct` share it. This re-export keeps the old path compiling until
//! its last users move.

pub use couponrush_core::producer::{Placement, ProduceError, RequestProducer};
