//! The wire format: what the api writes to `coupon.requests` and what the issuer
//! writes to `coupon.outcomes`.
//!
//! Records are versioned JSON (`"v": 1`) and carry a *zero payload*: ids and
//! timestamps only. Anything else a consumer needs (stock, the user's profile)
//! is looked up by id, so a record never carries stale state and stays small
//! (a request is ~150 bytes) when a hundred thousand of them arrive at once.
//!
//! Parsing never panics: a record that cannot be used is a [`Poison`] value
//! with the reason it goes to the dead-letter queue.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The only wire version this build writes and reads.
pub const WIRE_VERSION: u32 = 1;

/// A record larger than this is poison: a real request is ~150 bytes, so
/// anything this large was not written by the api.
pub const MAX_RECORD_BYTES: usize = 4096;

/// Longest accepted event id, in bytes.
pub const MAX_EVENT_ID_LEN: usize = 64;

/// Longest accepted user id, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;

/// Microseconds since the Unix epoch, the unit of every timestamp on the wire.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One request to issue a coupon, as accepted by the api.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueRequest {
    /// Wire version, always [`WIRE_VERSION`] when written by this build.
    pub v: u32,
    /// The request's identity: a UUID v7 (so ids sort by time), or, when the
    /// client sent an `Idempotency-Key`, a UUID v5 of (event, user, key), so a
    /// client's retries are one request and no two users share one.
    /// Deduplication in the store is by this id.
    pub request_id: Uuid,
    /// The drop this request takes part in.
    pub event_id: String,
    /// Who asked; the per-user limit is enforced on this id.
    pub user_id: String,
    /// When the api accepted the request, µs since the epoch: arrival order.
    pub accepted_at: u64,
}

impl IssueRequest {
    /// A request of the current wire version.
    pub fn new(request_id: Uuid, event_id: String, user_id: String, accepted_at: u64) -> Self {
        Self {
            v: WIRE_VERSION,
            request_id,
            event_id,
            user_id,
            accepted_at,
        }
    }

    /// Serializes the record for the requests topic.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request always serializes")
    }

    /// Parses and validates a record from the requests topic.
    pub fn parse(bytes: &[u8]) -> Result<Self, Poison> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(Poison::Oversized(bytes.len()));
        }
        match serde_json::from_slice::<IssueRequest>(bytes) {
            Ok(req) if req.v != WIRE_VERSION => Err(Poison::UnknownVersion(req.v)),
            Ok(req) => {
                validate_event_id(&req.event_id).map_err(Poison::InvalidField)?;
                validate_user_id(&req.user_id).map_err(Poison::InvalidField)?;
                Ok(req)
            }
            Err(err) => Err(classify_parse_error(bytes, err)),
        }
    }
}

/// A record that failed to parse because of its shape may still be a newer
/// version we do not know: look at `v` alone before calling it malformed.
fn classify_parse_error(bytes: &[u8], err: serde_json::Error) -> Poison {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    match serde_json::from_slice::<VersionOnly>(bytes) {
        Ok(VersionOnly { v }) if v != WIRE_VERSION => Poison::UnknownVersion(v),
        _ => Poison::Malformed(err.to_string()),
    }
}

/// Why a record on the requests topic cannot be decided; it goes to the DLQ
/// with this reason and the pipeline moves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poison {
    /// Larger than [`MAX_RECORD_BYTES`].
    Oversized(usize),
    /// Not JSON, or JSON without the fields of a request.
    Malformed(String),
    /// A `v` this build does not know.
    UnknownVersion(u32),
    /// A field is present but unusable (empty id, control characters, too long).
    InvalidField(String),
    /// The event does not exist in the store.
    UnknownEvent(String),
}

impl Poison {
    /// A short stable code for the `x-dlq-reason` header and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            Poison::Oversized(_) => "oversized",
            Poison::Malformed(_) => "malformed",
            Poison::UnknownVersion(_) => "unknown_version",
            Poison::InvalidField(_) => "invalid_field",
            Poison::UnknownEvent(_) => "unknown_event",
        }
    }
}

impl fmt::Display for Poison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Poison::Oversized(n) => write!(f, "record of {n} bytes exceeds {MAX_RECORD_BYTES}"),
            Poison::Malformed(e) => write!(f, "malformed record: {e}"),
            Poison::UnknownVersion(v) => write!(f, "unknown wire version {v}"),
            Poison::InvalidField(e) => write!(f, "invalid field: {e}"),
            Poison::UnknownEvent(e) => write!(f, "unknown event {e:?}"),
        }
    }
}

/// Checks an event id: 1 to 64 bytes of `[A-Za-z0-9._-]`, so it is safe in a
/// URL path, a Kafka key and a Redis hash tag (`{` and `}` are excluded).
pub fn validate_event_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_EVENT_ID_LEN {
        return Err(format!(
            "event_id must be 1 to {MAX_EVENT_ID_LEN} bytes, got {}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "event_id may contain only letters, digits, '.', '_' and '-', found {c:?}"
        ));
    }
    Ok(())
}

/// Checks a user id: 1 to 128 bytes of printable Unicode (no control
/// characters), so it is safe in logs, Kafka keys and Redis hash fields.
pub fn validate_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_USER_ID_LEN {
        return Err(format!(
            "user_id must be 1 to {MAX_USER_ID_LEN} bytes, got {}",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Err("user_id must not contain control characters".into());
    }
    Ok(())
}

/// What the store decided for one request. A business outcome, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionResult {
    /// A coupon was issued; `issued_rank` says which of the stock it was.
    Issued,
    /// No stock was left when the request was decided.
    SoldOut,
    /// The user already holds `per_user_limit` coupons of this event.
    LimitReached,
    /// The request id was already used by a different request; nothing was
    /// issued and the earlier request's decision stands. The api scopes keys
    /// by user, so only a producer writing to Kafka directly can cause it.
    Duplicate,
}

impl DecisionResult {
    /// All results, in a stable order (for reports and metrics).
    pub const ALL: [DecisionResult; 4] = [
        DecisionResult::Issued,
        DecisionResult::SoldOut,
        DecisionResult::LimitReached,
        DecisionResult::Duplicate,
    ];

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionResult::Issued => "issued",
            DecisionResult::SoldOut => "sold_out",
            DecisionResult::LimitReached => "limit_reached",
            DecisionResult::Duplicate => "duplicate",
        }
    }
}

impl fmt::Display for DecisionResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision for one request, as published on `coupon.outcomes`.
///
/// A redelivered request yields an outcome with the same `result`,
/// `issued_rank` and `decided_at` as the first one (`replay` is then true), so
/// readers may keep the first outcome per `request_id` and ignore the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Wire version.
    pub v: u32,
    /// The request decided.
    pub request_id: Uuid,
    /// Its event.
    pub event_id: String,
    /// Its user.
    pub user_id: String,
    /// What was decided.
    pub result: DecisionResult,
    /// 1..=stock for an issued coupon, absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_rank: Option<u32>,
    /// Partition of the request record that was decided.
    pub partition: i32,
    /// Offset of the request record that was decided.
    pub offset: i64,
    /// When the store first decided the request, µs since the epoch.
    pub decided_at: u64,
    /// True when this outcome restates an earlier decision (a redelivery).
    #[serde(default)]
    pub replay: bool,
    /// The event's decision sequence number: the exact order the store
    /// decided in (0 for `duplicate`).
    #[serde(default)]
    pub decision_seq: u64,
    /// The request's `accepted_at`, copied so a reader of outcomes alone can
    /// compare arrival and decision order.
    pub accepted_at: u64,
    /// The event's generation the decision belongs to (a reset starts a new
    /// one); a lost store is rebuilt from the outcomes of the latest one.
    #[serde(default)]
    pub generation: u64,
    /// For an issued coupon of an event with holds: the end of its claim
    /// window, µs since the epoch (it is `held` until claimed, cancelled or
    /// expired; a [`HoldOutcome`] tells which). Absent when the coupon is
    /// final at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_until: Option<u64>,
}

impl Outcome {
    /// Serializes the record for the outcomes topic.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an outcome always serializes")
    }

    /// Parses a record from the outcomes topic.
    pub fn parse(bytes: &[u8]) -> Result<Self, Poison> {
        match serde_json::from_slice::<Outcome>(bytes) {
            Ok(o) if o.v != WIRE_VERSION => Err(Poison::UnknownVersion(o.v)),
            Ok(o) => Ok(o),
            Err(err) => Err(classify_parse_error(bytes, err)),
        }
    }
}

/// What a holder (or the expiry sweep) asks of a held coupon, on the
/// compensations topic (`coupon.compensations`, key: the request id, so the
/// actions on one hold are in one partition, in the order they were
/// accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldVerb {
    /// Make the hold final (the payment went through): `claimed`.
    Claim,
    /// Give the coupon back (the payment failed, the user changed their
    /// mind): `released`, the coupon returns to stock.
    Cancel,
    /// The claim window passed without a claim: `expired`, the coupon
    /// returns to stock. Written by the issuers' expiry sweep, never by a
    /// client.
    Expire,
}

impl HoldVerb {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldVerb::Claim => "claim",
            HoldVerb::Cancel => "cancel",
            HoldVerb::Expire => "expire",
        }
    }
}

/// One action on a hold, as accepted by the api (claim, cancel) or written
/// by the expiry sweep (expire). Zero payload, like a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldAction {
    /// Wire version.
    pub v: u32,
    /// What is asked.
    pub action: HoldVerb,
    /// The request whose coupon is held.
    pub request_id: Uuid,
    /// Its event.
    pub event_id: String,
    /// Who asks: must be the holder (checked by the api and again by the
    /// store, which decides nothing for anyone else).
    pub user_id: String,
    /// When the api accepted the action (or the sweep found the hold due),
    /// µs since the epoch: a claim accepted before the hold's deadline is in
    /// time.
    pub at: u64,
}

impl HoldAction {
    /// An action of the current wire version.
    pub fn new(
        action: HoldVerb,
        request_id: Uuid,
        event_id: String,
        user_id: String,
        at: u64,
    ) -> Self {
        Self {
            v: WIRE_VERSION,
            action,
            request_id,
            event_id,
            user_id,
            at,
        }
    }

    /// Serializes the record for the compensations topic.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a hold action always serializes")
    }

    /// Parses and validates a record of the compensations topic.
    pub fn parse(bytes: &[u8]) -> Result<Self, Poison> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(Poison::Oversized(bytes.len()));
        }
        match serde_json::from_slice::<HoldAction>(bytes) {
            Ok(a) if a.v != WIRE_VERSION => Err(Poison::UnknownVersion(a.v)),
            Ok(a) => {
                validate_event_id(&a.event_id).map_err(Poison::InvalidField)?;
                validate_user_id(&a.user_id).map_err(Poison::InvalidField)?;
                Ok(a)
            }
            Err(err) => Err(classify_parse_error(bytes, err)),
        }
    }
}

/// Where a held coupon ended: the state a [`HoldAction`] moved it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    /// Issued and waiting for its claim, until `hold_until`.
    Held,
    /// Final: the holder claimed it in time.
    Claimed,
    /// The holder cancelled: back in stock.
    Released,
    /// Not claimed in time: back in stock.
    Expired,
}

impl HoldState {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Held => "held",
            HoldState::Claimed => "claimed",
            HoldState::Released => "released",
            HoldState::Expired => "expired",
        }
    }

    /// True when the coupon went back to stock.
    pub fn returned(self) -> bool {
        matches!(self, HoldState::Released | HoldState::Expired)
    }
}

impl fmt::Display for HoldState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the store decided for a [`HoldAction`], as published on
/// `coupon.outcomes` beside the drop's [`Outcome`]s (`"kind": "hold"` tells
/// them apart; [`LedgerRecord::parse`] reads both). Only actions that moved
/// a hold are published: a second cancel, an expiry after the claim, a claim
/// by someone else decide nothing and leave no record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldOutcome {
    /// Wire version.
    pub v: u32,
    /// Always `"hold"`.
    pub kind: String,
    /// The request whose coupon it is.
    pub request_id: Uuid,
    /// Its event.
    pub event_id: String,
    /// The holder.
    pub user_id: String,
    /// `claimed`, `released` or `expired` (never `held`).
    pub state: HoldState,
    /// The coupon's rank.
    pub issued_rank: u32,
    /// Partition of the action record decided.
    pub partition: i32,
    /// Offset of the action record decided.
    pub offset: i64,
    /// The action's `at`.
    pub action_at: u64,
    /// When the store decided the action, µs since the epoch.
    pub decided_at: u64,
    /// True when this restates an earlier decision (a redelivery).
    #[serde(default)]
    pub replay: bool,
    /// The event's decision sequence number (shared with the drop's
    /// decisions: one order for everything the store decided).
    pub decision_seq: u64,
    /// The event's generation.
    pub generation: u64,
}

/// The `kind` of a [`HoldOutcome`].
pub const HOLD_KIND: &str = "hold";

impl HoldOutcome {
    /// Serializes the record for the outcomes topic.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a hold outcome always serializes")
    }
}

/// A record of the outcomes topic: a request's decision or a hold's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerRecord {
    /// A request decided.
    Decision(Outcome),
    /// A hold claimed, released or expired.
    Hold(HoldOutcome),
}

impl LedgerRecord {
    /// Parses either kind.
    pub fn parse(bytes: &[u8]) -> Result<Self, Poison> {
        #[derive(Deserialize)]
        struct KindOnly {
            #[serde(default)]
            kind: Option<String>,
        }
        match serde_json::from_slice::<KindOnly>(bytes) {
            Ok(KindOnly { kind: Some(k) }) if k == HOLD_KIND => {
                match serde_json::from_slice::<HoldOutcome>(bytes) {
                    Ok(h) if h.v != WIRE_VERSION => Err(Poison::UnknownVersion(h.v)),
                    Ok(h) => Ok(LedgerRecord::Hold(h)),
                    Err(err) => Err(classify_parse_error(bytes, err)),
                }
            }
            _ => Outcome::parse(bytes).map(LedgerRecord::Decision),
        }
    }

    /// The event the record belongs to.
    pub fn event_id(&self) -> &str {
        match self {
            LedgerRecord::Decision(o) => &o.event_id,
            LedgerRecord::Hold(h) => &h.event_id,
        }
    }
}

/// An event's definition, as written to the events topic (key: the event
/// id) every time an admin creates or resets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Wire version.
    pub v: u32,
    /// The event.
    pub event_id: String,
    /// Coupons at the start.
    pub stock: u32,
    /// Coupons one user may hold.
    pub per_user_limit: u32,
    /// The generation this definition starts.
    pub generation: u64,
    /// When it was written, µs since the epoch.
    pub written_at: u64,
    /// The claim window, µs (0: no holds; absent in records written before
    /// holds existed).
    #[serde(default)]
    pub claim_window_us: u64,
    /// Buckets the stock is split over (absent in records written before
    /// buckets existed, and when 1: read as 1).
    #[serde(default = "one_bucket", skip_serializing_if = "is_one_bucket")]
    pub stock_buckets: u32,
}

fn one_bucket() -> u32 {
    1
}

fn is_one_bucket(k: &u32) -> bool {
    *k == 1
}

impl EventRecord {
    /// Serializes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event record always serializes")
    }

    /// Parses a record of the events topic.
    pub fn parse(bytes: &[u8]) -> Result<Self, Poison> {
        match serde_json::from_slice::<EventRecord>(bytes) {
            Ok(e) if e.v != WIRE_VERSION => Err(Poison::UnknownVersion(e.v)),
            Ok(e) => Ok(e),
            Err(err) => Err(classify_parse_error(bytes, err)),
        }
    }
}

/// Names of the headers on a dead-letter record.
pub mod dlq_headers {
    /// Stable reason code, see [`super::Poison::code`].
    pub const REASON: &str = "x-dlq-reason";
    /// Human-readable detail.
    pub const DETAIL: &str = "x-dlq-detail";
    /// Topic the record was read from.
    pub const ORIGINAL_TOPIC: &str = "x-original-topic";
    /// Partition the record was read from.
    pub const ORIGINAL_PARTITION: &str = "x-original-partition";
    /// Offset the record was read from.
    pub const ORIGINAL_OFFSET: &str = "x-original-offset";
}

/// Headers of outcome records (optional: readers must do without them).
pub mod outcome_headers {
    /// The client id of the issuer that published the outcome, so a report
    /// can show each issuer's share of the decisions.
    pub const ISSUER: &str = "x-issuer";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> IssueRequest {
        IssueRequest::new(
            Uuid::now_v7(),
            "drop-1".into(),
            "user-42".into(),
            1_700_000_000_000_000,
        )
    }

    #[test]
    fn request_round_trips() {
        let req = request();
        assert_eq!(IssueRequest::parse(&req.to_bytes()).unwrap(), req);
    }

    #[test]
    fn request_is_zero_payload_and_small() {
        let bytes = request().to_bytes();
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let mut keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["accepted_at", "event_id", "request_id", "user_id", "v"]
        );
    }

    #[test]
    fn outcome_round_trips_with_and_without_rank() {
        let mut o = Outcome {
            v: WIRE_VERSION,
            request_id: Uuid::now_v7(),
            event_id: "e".into(),
            user_id: "u".into(),
            result: DecisionResult::Issued,
            issued_rank: Some(7),
            partition: 3,
            offset: 99,
            decided_at: 5,
            replay: false,
            decision_seq: 1,
            accepted_at: 4,
            generation: 2,
            hold_until: None,
        };
        assert_eq!(Outcome::parse(&o.to_bytes()).unwrap(), o);
        o.result = DecisionResult::SoldOut;
        o.issued_rank = None;
        let bytes = o.to_bytes();
        assert!(!String::from_utf8_lossy(&bytes).contains("issued_rank"));
        assert_eq!(Outcome::parse(&bytes).unwrap(), o);
        assert!(String::from_utf8_lossy(&bytes).contains("\"sold_out\""));
    }

    #[test]
    fn the_ledger_tells_a_decision_from_a_hold_and_actions_round_trip() {
        let a = HoldAction::new(
            HoldVerb::Claim,
            Uuid::now_v7(),
            "drop".into(),
            "u".into(),
            7,
        );
        assert_eq!(HoldAction::parse(&a.to_bytes()).unwrap(), a);
        assert!(String::from_utf8_lossy(&a.to_bytes()).contains("\"claim\""));
        let mut bad = a.clone();
        bad.event_id = "{slot}".into();
        assert!(matches!(
            HoldAction::parse(&bad.to_bytes()),
            Err(Poison::InvalidField(_))
        ));
        let h = HoldOutcome {
            v: WIRE_VERSION,
            kind: HOLD_KIND.into(),
            request_id: a.request_id,
            event_id: "drop".into(),
            user_id: "u".into(),
            state: HoldState::Released,
            issued_rank: 3,
            partition: 0,
            offset: 1,
            action_at: 7,
            decided_at: 8,
            replay: false,
            decision_seq: 9,
            generation: 1,
        };
        assert_eq!(
            LedgerRecord::parse(&h.to_bytes()).unwrap(),
            LedgerRecord::Hold(h.clone())
        );
        // A hold record is never mistaken for a decision, and back.
        assert!(Outcome::parse(&h.to_bytes()).is_err());
        let o = Outcome {
            v: WIRE_VERSION,
            request_id: a.request_id,
            event_id: "drop".into(),
            user_id: "u".into(),
            result: DecisionResult::Issued,
            issued_rank: Some(3),
            partition: 0,
            offset: 0,
            decided_at: 1,
            replay: false,
            decision_seq: 1,
            accepted_at: 1,
            generation: 1,
            hold_until: Some(99),
        };
        assert_eq!(
            LedgerRecord::parse(&o.to_bytes()).unwrap(),
            LedgerRecord::Decision(o)
        );
        assert!(HoldState::Expired.returned() && !HoldState::Claimed.returned());
    }

    #[test]
    fn event_record_round_trips() {
        let e = EventRecord {
            v: WIRE_VERSION,
            event_id: "drop".into(),
            stock: 10,
            per_user_limit: 1,
            generation: 3,
            written_at: 9,
            claim_window_us: 0,
            stock_buckets: 1,
        };
        // A record written before holds existed still reads.
        let old = br#"{"v":1,"event_id":"drop","stock":10,"per_user_limit":1,"generation":3,"written_at":9}"#;
        assert_eq!(EventRecord::parse(old).unwrap(), e);
        assert_eq!(EventRecord::parse(&e.to_bytes()).unwrap(), e);
        assert!(EventRecord::parse(b"{}").is_err());
    }

    #[test]
    fn poison_is_classified() {
        assert!(matches!(
            IssueRequest::parse(b"not json"),
            Err(Poison::Malformed(_))
        ));
        assert!(matches!(
            IssueRequest::parse(b"{\"v\":1}"),
            Err(Poison::Malformed(_))
        ));
        assert_eq!(
            IssueRequest::parse(b"{\"v\":2,\"something\":\"else\"}"),
            Err(Poison::UnknownVersion(2))
        );
        let mut req = request();
        req.v = 9;
        assert_eq!(
            IssueRequest::parse(&req.to_bytes()),
            Err(Poison::UnknownVersion(9))
        );
        assert!(matches!(
            IssueRequest::parse(&vec![b' '; MAX_RECORD_BYTES + 1]),
            Err(Poison::Oversized(_))
        ));
        let mut req = request();
        req.user_id = "a\u{0}b".into();
        assert!(matches!(
            IssueRequest::parse(&req.to_bytes()),
            Err(Poison::InvalidField(_))
        ));
        let mut req = request();
        req.event_id = "{slot}".into();
        assert!(matches!(
            IssueRequest::parse(&req.to_bytes()),
            Err(Poison::InvalidField(_))
        ));
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_event_id("spring-sale_2026.v2").is_ok());
        assert!(validate_event_id("").is_err());
        assert!(validate_event_id(&"x".repeat(65)).is_err());
        assert!(validate_event_id("a/b").is_err());
        assert!(validate_user_id("김철수").is_ok());
        assert!(validate_user_id("").is_err());
        assert!(validate_user_id("a\nb").is_err());
        assert!(validate_user_id(&"x".repeat(129)).is_err());
    }
}
