//! On tansu 0.6, a fetch from the middle of a partition's last producer
//! batch answers nothing (see `notifier/src/broker_quirk.rs`): a notifier
//! starting from such a committed offset must still deliver the rest of
//! the partition, although nothing new is written to it.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::{eventually, ledger, Setup};
use couponrush_lab::receiver::Receiver;
use couponrush_notifier::{run_probed, Probe};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_the_middle_of_the_last_batch_does_not_stall_a_partition_on_tansu() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("notifier-tansu-tail");
    std::fs::create_dir_all(&dir).unwrap();
    let setup = Setup::on_tansu(&dir.join("tansu.log")).await;
    let ledger = ledger(&setup.event, 60);
    setup.produce_one_batch_and_commit(&ledger, 5).await;
    let r = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let probe = Probe::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_probed(
        setup.config(&r.url()),
        stop.clone(),
        probe.clone(),
    ));
    let expected: HashSet<String> = ledger.expected.keys().cloned().collect();
    let complete = eventually(Duration::from_secs(60), || async {
        r.stats().unique_keys >= expected.len() as u64
    })
    .await;
    stop.cancel();
    let totals = task.await.unwrap().unwrap();
    assert!(
        complete,
        "60 s without new records: {:?}, {totals:?}",
        r.stats()
    );
    assert_eq!(r.counts().into_keys().collect::<HashSet<_>>(), expected);
    assert_eq!(
        totals.read as usize,
        ledger.records.len(),
        "the prefix below the committed offset is skipped, not delivered again"
    );
}
