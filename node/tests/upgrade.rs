//! Upgrading a data directory as an operator would: a database written
//! before schema versions were stamped is refused untouched, `run
//! --migrate` upgrades it once, and later starts need no flag.

use std::time::Duration;

use nix::sys::signal::Signal;
use openagi_tests::{Daemon, DaemonOptions, init, use_binary, wait_for};
use redb::{Database, TableDefinition};

/// The tables of schema 1 that matter here, by their on-disk names.
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const TX_INDEX: TableDefinition<'_, &[u8; 32], (u64, u32)> = TableDefinition::new("tx_index");

/// Writes `node.redb` as versions before the schema stamp did: no
/// `schema_version`, the transaction index inside the store.
fn write_schema_1_store(dir: &std::path::Path) {
    let db = Database::create(dir.join("node.redb")).expect("create");
    let txn = db.begin_write().expect("write");
    {
        let mut meta = txn.open_table(META).expect("meta");
        meta.insert("starts", 5u64.to_le_bytes().as_slice())
            .expect("starts");
        let mut index = txn.open_table(TX_INDEX).expect("tx_index");
        index.insert(&[1u8; 32], (1, 0)).expect("entry");
    }
    txn.commit().expect("commit");
}

#[test]
fn an_old_database_is_refused_until_run_migrate_upgrades_it() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("node");
    init(&dir).expect("init");
    write_schema_1_store(&dir);

    let mut refused = Daemon::spawn(&dir, &DaemonOptions::default()).expect("spawns");
    let status = wait_for("refusal", Duration::from_secs(20), || {
        refused.try_wait().ok().flatten()
    })
    .expect("exits");
    assert!(!status.success(), "an old schema must stop start-up");
    let log = std::fs::read_to_string(dir.join("daemon.log")).expect("log");
    assert!(
        log.contains("schema version 1") && log.contains("openagi run --migrate"),
        "the refusal names the version and the fix:\n{log}"
    );

    let migrate = DaemonOptions {
        args: vec!["--migrate".into()],
        ..Default::default()
    };
    let mut node = Daemon::start(&dir, &migrate).expect("migrates and starts");
    assert!(
        node.log().contains("database migrated"),
        "the migration is logged:\n{}",
        node.log()
    );
    node.signal(Signal::SIGTERM).expect("SIGTERM");
    assert!(
        node.wait_exit(Duration::from_secs(20))
            .expect("exits")
            .success()
    );
    drop(node);
    assert_eq!(read_meta_u64(&dir, "starts"), 6, "stored data kept");
    assert_eq!(read_meta_u32(&dir, "schema_version"), 2);

    let mut node = Daemon::start(&dir, &DaemonOptions::default()).expect("starts without the flag");
    node.signal(Signal::SIGTERM).expect("SIGTERM");
    assert!(
        node.wait_exit(Duration::from_secs(20))
            .expect("exits")
            .success()
    );
    assert_eq!(read_meta_u64(&dir, "starts"), 7);
}

fn read_meta(dir: &std::path::Path, key: &str) -> Vec<u8> {
    use redb::ReadableDatabase;
    let db = Database::open(dir.join("node.redb")).expect("open");
    let txn = db.begin_read().expect("read");
    let meta = txn.open_table(META).expect("meta");
    let value = meta.get(key).expect("get").expect("present");
    value.value().to_vec()
}

fn read_meta_u64(dir: &std::path::Path, key: &str) -> u64 {
    u64::from_le_bytes(read_meta(dir, key).try_into().expect("8 bytes"))
}

fn read_meta_u32(dir: &std::path::Path, key: &str) -> u32 {
    u32::from_le_bytes(read_meta(dir, key).try_into().expect("4 bytes"))
}
