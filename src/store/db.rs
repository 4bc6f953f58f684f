//! The SQLite database the store moves to (issue 21): one file in
//! `[store] path`, opened with the pragmas every write's durability rests on,
//! its schema versioned by `PRAGMA user_version` and brought up to date by a
//! list of migrations, each applied in one transaction. A database newer than
//! this binary is refused, never changed.
//!
//! What the schema keeps in clear, so that `tasks`, `status` and retention
//! are queries: statuses, kinds, outcomes and times. Everything that names a
//! person or could be joined to one (local ids, IDAT, Bloom filters,
//! pseudonyms, task contents, the dispatcher's text) is sealed (AES-256-GCM
//! under the store key) or stands as a keyed HMAC index.

use rusqlite::{Connection, OpenFlags, Transaction};
use std::path::{Path, PathBuf};

/// The database file inside `[store] path`.
pub const FILE: &str = "store.sqlite3";

#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error("store database {path}: {what}: {source}")]
    Sqlite {
        path: PathBuf,
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error("store database {path}: cannot create it: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "store database {path} has schema version {found}, newer than this fttp-agent knows ({known}): \
         use the release that wrote it or a newer one (nothing was changed)"
    )]
    Newer { path: PathBuf, found: u32, known: u32 },
}

/// The schema, one migration per version: `MIGRATIONS[0]` makes version 1.
/// Never edit a migration that has shipped; add the next one.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the tables of the store (see the module comment for what is
    // sealed). `*_index` columns are keyed HMACs; `sealed` columns are
    // AES-256-GCM with the row's other columns as associated data (`rows`).
    "CREATE TABLE meta (
         key TEXT PRIMARY KEY,
         value ANY NOT NULL
     ) STRICT;
     CREATE TABLE patients (
         id_index BLOB PRIMARY KEY,
         bf_index BLOB,
         id_sealed BLOB NOT NULL,
         sealed BLOB NOT NULL,
         updated INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX patients_by_bf ON patients (bf_index) WHERE bf_index IS NOT NULL;
     CREATE TABLE pseudonyms (
         bf_index BLOB NOT NULL,
         target TEXT NOT NULL,
         psn_index BLOB NOT NULL,
         received INTEGER NOT NULL,
         source TEXT NOT NULL,
         sealed BLOB NOT NULL,
         PRIMARY KEY (bf_index, target)
     ) STRICT;
     CREATE INDEX pseudonyms_by_value ON pseudonyms (psn_index, target);
     CREATE TABLE ledger (
         id INTEGER PRIMARY KEY,
         key_index BLOB NOT NULL UNIQUE,
         kind TEXT NOT NULL,
         status TEXT NOT NULL,
         outcome TEXT NOT NULL,
         expires INTEGER,
         first_seen INTEGER NOT NULL,
         last_seen INTEGER NOT NULL,
         updated INTEGER NOT NULL,
         attempts INTEGER NOT NULL,
         sealed BLOB NOT NULL
     ) STRICT;
     CREATE TABLE ledger_tasks (
         id INTEGER PRIMARY KEY REFERENCES ledger (id) ON DELETE CASCADE,
         sealed BLOB NOT NULL
     ) STRICT;
     CREATE TABLE enrolments (
         id_index BLOB PRIMARY KEY,
         bf_index BLOB NOT NULL,
         status TEXT NOT NULL,
         updated INTEGER NOT NULL,
         sealed BLOB NOT NULL
     ) STRICT;
     CREATE TABLE tombstones (
         tombstone_index BLOB PRIMARY KEY,
         sealed BLOB NOT NULL
     ) STRICT;
     CREATE TABLE polls (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         sealed BLOB NOT NULL
     ) STRICT;",
    // 2: several studies. Pseudonyms, enrolments and polls are kept per
    // study; rows from before carry the study "" (and seals without it)
    // until `Store::adopt_legacy` gives them the configured study.
    "CREATE TABLE pseudonyms_2 (
         bf_index BLOB NOT NULL,
         study TEXT NOT NULL,
         target TEXT NOT NULL,
         psn_index BLOB NOT NULL,
         received INTEGER NOT NULL,
         source TEXT NOT NULL,
         sealed BLOB NOT NULL,
         PRIMARY KEY (bf_index, study)
     ) STRICT;
     INSERT INTO pseudonyms_2 SELECT bf_index, '', target, psn_index, received, source, sealed FROM pseudonyms;
     DROP TABLE pseudonyms;
     ALTER TABLE pseudonyms_2 RENAME TO pseudonyms;
     CREATE INDEX pseudonyms_by_value ON pseudonyms (psn_index, study);
     CREATE TABLE enrolments_2 (
         id_index BLOB NOT NULL,
         study TEXT NOT NULL,
         bf_index BLOB NOT NULL,
         status TEXT NOT NULL,
         updated INTEGER NOT NULL,
         sealed BLOB NOT NULL,
         PRIMARY KEY (id_index, study)
     ) STRICT;
     INSERT INTO enrolments_2 SELECT id_index, '', bf_index, status, updated, sealed FROM enrolments;
     DROP TABLE enrolments;
     ALTER TABLE enrolments_2 RENAME TO enrolments;
     CREATE TABLE polls_2 (
         study TEXT PRIMARY KEY,
         sealed BLOB NOT NULL
     ) STRICT;
     INSERT INTO polls_2 SELECT '', sealed FROM polls;
     DROP TABLE polls;
     ALTER TABLE polls_2 RENAME TO polls;
     INSERT INTO meta (key, value) SELECT 'needs_study', 1 WHERE EXISTS (SELECT 1 FROM pseudonyms)
         OR EXISTS (SELECT 1 FROM enrolments) OR EXISTS (SELECT 1 FROM polls) OR EXISTS (SELECT 1 FROM ledger);",
];

/// The schema version this binary writes.
pub(crate) fn current_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// An open store database, its schema up to date.
pub(crate) struct Db {
    path: PathBuf,
    conn: Connection,
}

impl Db {
    /// Opens (creating it if need be) the database in `dir` for reading and
    /// writing, with WAL (readers do not block the writer, nor it them),
    /// `synchronous = FULL` (a commit is on disk before the dispatcher hears
    /// of what it records), foreign keys and `secure_delete` (an erased
    /// patient's pages are overwritten, not left in the file).
    pub fn open(dir: &Path) -> Result<Db, DbError> {
        Db::open_file(&dir.join(FILE))
    }

    /// `open` for a database file of another name (a migration builds the
    /// new store beside the old one, under a temporary name).
    pub(crate) fn open_file(path: &Path) -> Result<Db, DbError> {
        Db::open_with(path, MIGRATIONS)
    }

    pub(super) fn open_with(path: &Path, migrations: &[&str]) -> Result<Db, DbError> {
        let path = path.to_path_buf();
        let err = |what: &'static str| {
            let path = path.clone();
            move |source| DbError::Sqlite { path, what, source }
        };
        // Created private first: SQLite gives its WAL and shared-memory
        // files the database file's mode.
        create_private(&path).map_err(|source| DbError::Io {
            path: path.clone(),
            source,
        })?;
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err("open"))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(err("set the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err("switch to WAL"))?;
        // (cache_size: 32 MiB, used only as pages are touched: a large
        // import's random index inserts spilled the default 2 MiB.
        // wal_autocheckpoint: 40 MiB of log between checkpoints instead of
        // 4: a cycle rewrites the same ledger pages several times, and each
        // checkpoint copied them again; it took a sixth of a large cycle.)
        for (pragma, value) in [
            ("synchronous", "FULL"),
            ("foreign_keys", "ON"),
            ("secure_delete", "ON"),
            ("cache_size", "-32768"),
            ("wal_autocheckpoint", "10000"),
        ] {
            conn.pragma_update(None, pragma, value).map_err(err("set a pragma"))?;
        }
        // Every statement of a write stays prepared (the default 16 were
        // evicted and prepared again within one cycle).
        conn.set_prepared_statement_cache_capacity(64);
        let mut db = Db { path, conn };
        db.migrate(migrations)?;
        Ok(db)
    }

    /// The schema version the database holds.
    pub fn version(&self) -> Result<u32, DbError> {
        self.conn
            .pragma_query_value(None, "user_version", |row| row.get::<_, u32>(0))
            .map_err(|source| DbError::Sqlite {
                path: self.path.clone(),
                what: "read the schema version",
                source,
            })
    }

    /// Applies every migration past the database's version, each with its
    /// version bump in one transaction: a crash leaves the version before
    /// or after it, never half a migration.
    fn migrate(&mut self, migrations: &[&str]) -> Result<(), DbError> {
        let found = self.version()?;
        let known = migrations.len() as u32;
        if found > known {
            return Err(DbError::Newer {
                path: self.path.clone(),
                found,
                known,
            });
        }
        for (i, sql) in migrations.iter().enumerate().skip(found as usize) {
            let version = i as u32 + 1;
            let path = self.path.clone();
            let err = move |source| DbError::Sqlite {
                path: path.clone(),
                what: "migrate the schema",
                source,
            };
            let tx = self.conn.transaction().map_err(err.clone())?;
            apply(&tx, sql, version).map_err(err.clone())?;
            tx.commit().map_err(err)?;
        }
        Ok(())
    }

    /// A read-only connection to the same database, for readers that run
    /// while a cycle writes (status, export, the local service): WAL gives
    /// them a consistent snapshot without blocking the writer.
    pub fn reader(dir: &Path) -> Result<Db, DbError> {
        let path = dir.join(FILE);
        let err = |what: &'static str| {
            let path = path.clone();
            move |source| DbError::Sqlite { path, what, source }
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err("open for reading"))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(err("set the busy timeout"))?;
        let db = Db { path, conn };
        let found = db.version()?;
        if found > current_version() {
            return Err(DbError::Newer {
                path: db.path,
                found,
                known: current_version(),
            });
        }
        Ok(db)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `path` (mode 0600) if it does not exist.
pub(crate) fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map(drop),
    }
}

fn apply(tx: &Transaction<'_>, sql: &str, version: u32) -> rusqlite::Result<()> {
    tx.execute_batch(sql)?;
    tx.pragma_update(None, "user_version", version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_gets_the_current_schema_and_the_durable_pragmas() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.version().unwrap(), current_version());
        let pragma = |name: &str| -> String {
            db.connection()
                .pragma_query_value(None, name, |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| match v {
                    rusqlite::types::Value::Integer(i) => i.to_string(),
                    rusqlite::types::Value::Text(t) => t,
                    other => format!("{other:?}"),
                })
                .unwrap()
        };
        assert_eq!(pragma("journal_mode"), "wal");
        assert_eq!(pragma("synchronous"), "2", "FULL");
        assert_eq!(pragma("foreign_keys"), "1");
        assert_eq!(pragma("secure_delete"), "1");
        // Opening again changes nothing.
        drop(db);
        assert_eq!(Db::open(dir.path()).unwrap().version().unwrap(), current_version());
    }

    #[test]
    fn a_database_newer_than_the_binary_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.connection()
            .pragma_update(None, "user_version", current_version() + 1)
            .unwrap();
        drop(db);
        let before = std::fs::read(dir.path().join(FILE)).unwrap();
        let e = Db::open(dir.path()).err().unwrap();
        assert!(
            matches!(e, DbError::Newer { found, known, .. } if found == known + 1),
            "{e}"
        );
        assert!(e.to_string().contains("nothing was changed"));
        assert_eq!(std::fs::read(dir.path().join(FILE)).unwrap(), before);
    }

    #[test]
    fn a_failing_migration_leaves_the_version_before_it() {
        let dir = tempfile::tempdir().unwrap();
        drop(Db::open(dir.path()).unwrap());
        let mut broken: Vec<&str> = MIGRATIONS.to_vec();
        // Half of it would succeed: the table, then an error.
        broken.push("CREATE TABLE added (x INTEGER) STRICT; INSERT INTO no_such_table VALUES (1);");
        assert!(Db::open_with(&dir.path().join(FILE), &broken).is_err());
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.version().unwrap(), current_version());
        let added: i64 = db
            .connection()
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'added'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(added, 0, "the migration's first statement was rolled back with it");
    }

    #[test]
    fn a_reader_sees_committed_rows_while_the_writer_holds_a_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path()).unwrap();
        db.connection()
            .execute("INSERT INTO meta (key, value) VALUES ('generation', '1')", [])
            .unwrap();
        let tx = db.conn.transaction().unwrap();
        tx.execute("UPDATE meta SET value = '2' WHERE key = 'generation'", [])
            .unwrap();
        // Not blocked, and not shown half a write.
        let reader = Db::reader(dir.path()).unwrap();
        let reader = reader.connection();
        let seen: String = reader
            .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, "1");
        tx.commit().unwrap();
        let seen: String = reader
            .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, "2");
    }
}
