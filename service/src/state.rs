//! The service's state, in SQLite (bundled): runs, each VM's result and
//! freeze metrics, progress, errors, skips, and when each job last fired.
//! It survives restarts; a run still marked running when the service
//! starts was cut short by the process's death, and is marked failed with
//! the reason (its guests were thawed by their agents' watchdogs, and its
//! snapshots are removed by the next run's clean-up).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::error::{ErrorKind, Result};

/// How many read-only connections serve the API.
const READERS: usize = 4;

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(c)
}

/// The schema's version, in `PRAGMA user_version`.
const SCHEMA: i64 = 1;

const CREATE: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    kind TEXT NOT NULL,
    trigger TEXT NOT NULL,
    scheduled_for INTEGER,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    state TEXT NOT NULL,
    error TEXT,
    note TEXT,
    done_bytes INTEGER NOT NULL DEFAULT 0,
    total_bytes INTEGER NOT NULL DEFAULT 0,
    pid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, id);
CREATE TABLE IF NOT EXISTS vm_results (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    vm TEXT NOT NULL,
    snapshot TEXT,
    consistency TEXT,
    error TEXT,
    freeze_window_us INTEGER,
    stall_us INTEGER,
    host_window_us INTEGER,
    virtual_bytes INTEGER NOT NULL DEFAULT 0,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    new_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, vm)
);
CREATE INDEX IF NOT EXISTS vm_results_vm ON vm_results (vm, run_id);
CREATE TABLE IF NOT EXISTS verified (
    snapshot TEXT PRIMARY KEY,
    at INTEGER NOT NULL,
    ok INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fired (
    job TEXT PRIMARY KEY,
    at INTEGER NOT NULL
);
";

/// How a run began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Schedule,
    /// Through the API.
    Manual,
    /// A persistent job's run missed while the service was down.
    Missed,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Not run: the job's previous run was still going.
    Skipped,
}

pub(crate) fn name<T: Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// One run, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: i64,
    pub job: String,
    pub kind: String,
    pub trigger: String,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub state: String,
    pub error: Option<String>,
    /// What a run that succeeded has to say (retention, warnings).
    pub note: Option<String>,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// One VM's part in a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmResult {
    pub vm: String,
    pub snapshot: Option<String>,
    pub consistency: Option<String>,
    pub error: Option<String>,
    pub freeze_window_us: Option<u64>,
    pub stall_us: Option<u64>,
    pub host_window_us: Option<u64>,
    pub virtual_bytes: u64,
    pub bytes_read: u64,
    pub new_bytes: u64,
}

/// A VM's result with its run's times, for its history.
#[derive(Debug, Clone, Serialize)]
pub struct VmRun {
    pub run_id: i64,
    pub job: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(flatten)]
    pub result: VmResult,
}

/// The upper bounds (seconds) of the freeze-window histogram's buckets.
pub const FREEZE_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What `/metrics` says of one VM, over every run the state holds.
#[derive(Debug, Clone, Default)]
pub struct VmStats {
    pub vm: String,
    pub failures: u64,
    pub bytes_read_total: u64,
    pub new_bytes_total: u64,
    pub last_success: Option<DateTime<Utc>>,
    /// Of its latest result.
    pub last_freeze_window_us: Option<u64>,
    pub last_stall_us: Option<u64>,
    pub last_bytes_read: u64,
    pub last_new_bytes: u64,
    pub last_run_ms: Option<u64>,
    /// Cumulative: how many freeze windows fit each of [`FREEZE_BUCKETS`].
    pub window_buckets: Vec<u64>,
    pub window_count: u64,
    pub window_sum_us: u64,
}

pub struct State {
    path: PathBuf,
    /// The one connection that writes.
    conn: Mutex<Connection>,
    /// Read-only connections for the API's readers: in WAL mode they read
    /// alongside each other and the writer.
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
    /// `serve.lock`, held by the one service that owns this state.
    _lock: Option<std::fs::File>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl State {
    /// Opens (or creates) `dir/state.sqlite` for the service that owns
    /// it: one at a time (`dir/serve.lock`). Runs left `running` by a dead
    /// process are marked failed, with the reason; their ids are returned.
    pub fn open(dir: &Path) -> Result<(State, Vec<i64>)> {
        std::fs::create_dir_all(dir).map_err(|e| {
            crate::Error::from(ErrorKind::Io(e))
                .at(format!("{}: create the state directory", dir.display()))
        })?;
        let lock_path = dir.join("serve.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                crate::Error::from(ErrorKind::Io(e)).at(format!("{}: open", lock_path.display()))
            })?;
        if let Err(e) = lock.try_lock() {
            let why = match e {
                std::fs::TryLockError::WouldBlock => {
                    "another vsnap serve uses this state directory".to_string()
                }
                std::fs::TryLockError::Error(e) => e.to_string(),
            };
            return Err(
                crate::Error::from(ErrorKind::Config(why)).at(lock_path.display().to_string())
            );
        }
        let path = dir.join("state.sqlite");
        let db = |e: rusqlite::Error| {
            crate::Error::from(ErrorKind::Database(Box::new(e))).at(path.display().to_string())
        };
        // The owner's alone, as the token is: run history names VMs,
        // hosts and errors. SQLite gives its -wal and -shm files the
        // database's mode.
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let io = |e: std::io::Error| {
                crate::Error::from(ErrorKind::Io(e)).at(path.display().to_string())
            };
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
        }
        let conn = Connection::open(&path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db)?;
        if version > SCHEMA {
            return Err(crate::Error::from(ErrorKind::Config(format!(
                "the state database has schema {version}, newer than this vsnap's {SCHEMA}; run a newer vsnap"
            )))
            .at(path.display().to_string()));
        }
        conn.execute_batch(CREATE).map_err(db)?;
        conn.pragma_update(None, "user_version", SCHEMA)
            .map_err(db)?;
        let mut readers = Vec::new();
        for _ in 0..READERS {
            readers.push(Mutex::new(open_reader(&path).map_err(db)?));
        }
        let state = State {
            path: path.clone(),
            conn: Mutex::new(conn),
            readers,
            next_reader: std::sync::atomic::AtomicUsize::new(0),
            _lock: Some(lock),
        };
        let cut = state.fail_interrupted()?;
        Ok((state, cut))
    }

    /// Opens `dir/state.sqlite` read-only, beside a running service: no
    /// lock, and nothing changed.
    pub fn observe(dir: &Path) -> Result<State> {
        let path = dir.join("state.sqlite");
        let db = |e: rusqlite::Error| {
            crate::Error::from(ErrorKind::Database(Box::new(e))).at(path.display().to_string())
        };
        let conn = open_reader(&path).map_err(db)?;
        Ok(State {
            path: path.clone(),
            conn: Mutex::new(conn),
            readers: Vec::new(),
            next_reader: std::sync::atomic::AtomicUsize::new(0),
            _lock: None,
        })
    }

    /// A reader connection: a free one if there is, else the next.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        let n = self.readers.len();
        if n == 0 {
            return self.conn();
        }
        let start = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..n {
            if let Ok(g) = self.readers[(start + i) % n].try_lock() {
                return g;
            }
        }
        self.readers[start % n]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held leaves SQLite consistent (each
        // statement is atomic), so the connection is still good.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn db(&self, during: &str) -> impl Fn(rusqlite::Error) -> crate::Error + '_ {
        let during = during.to_string();
        move |e| {
            crate::Error::from(ErrorKind::Database(Box::new(e)))
                .at(format!("{}: {during}", self.path.display()))
        }
    }

    fn fail_interrupted(&self) -> Result<Vec<i64>> {
        let c = self.conn();
        let mut stmt = c
            .prepare_cached("SELECT id, pid FROM runs WHERE state = 'running'")
            .map_err(self.db("find interrupted runs"))?;
        let cut: Vec<(i64, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.db("find interrupted runs"))?
            .collect::<std::result::Result<_, _>>()
            .map_err(self.db("find interrupted runs"))?;
        for (id, pid) in &cut {
            c.execute(
                "UPDATE runs SET state = 'failed', finished_at = ?2, error = ?3 WHERE id = ?1",
                params![
                    id,
                    ms(Utc::now()),
                    format!("the service (pid {pid}) stopped while this run was in progress; the guests' agents thawed them at their hold limit, and the next run removes what this one left")
                ],
            )
            .map_err(self.db("mark an interrupted run failed"))?;
        }
        Ok(cut.into_iter().map(|c| c.0).collect())
    }

    /// Records a run that starts now.
    pub fn begin(
        &self,
        job: &str,
        kind: &str,
        trigger: Trigger,
        scheduled_for: Option<DateTime<Utc>>,
    ) -> Result<i64> {
        let c = self.conn();
        c.execute(
            "INSERT INTO runs (job, kind, trigger, scheduled_for, started_at, state, pid) VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)",
            params![job, kind, name(trigger), scheduled_for.map(ms), ms(Utc::now()), std::process::id()],
        )
        .map_err(self.db("record a run"))?;
        Ok(c.last_insert_rowid())
    }

    /// Records a run that did not happen, and why.
    pub fn skip(
        &self,
        job: &str,
        kind: &str,
        trigger: Trigger,
        scheduled_for: Option<DateTime<Utc>>,
        why: &str,
    ) -> Result<i64> {
        let now = ms(Utc::now());
        let c = self.conn();
        c.execute(
            "INSERT INTO runs (job, kind, trigger, scheduled_for, started_at, finished_at, state, error, pid) VALUES (?1, ?2, ?3, ?4, ?5, ?5, 'skipped', ?6, ?7)",
            params![job, kind, name(trigger), scheduled_for.map(ms), now, why, std::process::id()],
        )
        .map_err(self.db("record a skipped run"))?;
        Ok(c.last_insert_rowid())
    }

    pub fn progress(&self, run: i64, done: u64, total: u64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE runs SET done_bytes = ?2, total_bytes = ?3 WHERE id = ?1",
                params![run, i(done), i(total)],
            )
            .map(drop)
            .map_err(self.db("record progress"))
    }

    /// Ends a run, with each VM's result, in one transaction.
    pub fn finish(
        &self,
        run: i64,
        state: RunState,
        error: Option<&str>,
        note: Option<&str>,
        vms: &[VmResult],
    ) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(self.db("end a run"))?;
        tx.execute(
            "UPDATE runs SET state = ?2, error = ?3, note = ?4, finished_at = ?5 WHERE id = ?1",
            params![run, name(state), error, note, ms(Utc::now())],
        )
        .map_err(self.db("end a run"))?;
        for v in vms {
            tx.execute(
                "INSERT OR REPLACE INTO vm_results (run_id, vm, snapshot, consistency, error, freeze_window_us, stall_us, host_window_us, virtual_bytes, bytes_read, new_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    run,
                    v.vm,
                    v.snapshot,
                    v.consistency,
                    v.error,
                    v.freeze_window_us.map(i),
                    v.stall_us.map(i),
                    v.host_window_us.map(i),
                    i(v.virtual_bytes),
                    i(v.bytes_read),
                    i(v.new_bytes)
                ],
            )
            .map_err(self.db("record a VM's result"))?;
        }
        tx.commit().map_err(self.db("end a run"))
    }

    /// When `job` last fired on its schedule, for `Persistent=`.
    pub fn last_fired(&self, job: &str) -> Result<Option<DateTime<Utc>>> {
        self.reader()
            .query_row("SELECT at FROM fired WHERE job = ?1", params![job], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|o| o.map(at))
            .map_err(self.db("read when a job fired"))
    }

    pub fn set_fired(&self, job: &str, when: DateTime<Utc>) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO fired (job, at) VALUES (?1, ?2) ON CONFLICT (job) DO UPDATE SET at = excluded.at",
                params![job, ms(when)],
            )
            .map(drop)
            .map_err(self.db("record when a job fired"))
    }

    /// The newest runs first, of `job` or of all.
    pub fn runs(&self, job: Option<&str>, limit: u32) -> Result<Vec<Run>> {
        let c = self.reader();
        let mut stmt = c
            .prepare_cached(
                "SELECT id, job, kind, trigger, scheduled_for, started_at, finished_at, state, error, note, done_bytes, total_bytes FROM runs WHERE (?1 IS NULL OR job = ?1) ORDER BY id DESC LIMIT ?2",
            )
            .map_err(self.db("list runs"))?;
        let rows = stmt
            .query_map(params![job, limit], run_row)
            .map_err(self.db("list runs"))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.db("list runs"));
        rows
    }

    /// One run, with its VMs' results.
    pub fn run(&self, id: i64) -> Result<Option<(Run, Vec<VmResult>)>> {
        let c = self.reader();
        let run = c
            .query_row(
                "SELECT id, job, kind, trigger, scheduled_for, started_at, finished_at, state, error, note, done_bytes, total_bytes FROM runs WHERE id = ?1",
                params![id],
                run_row,
            )
            .optional()
            .map_err(self.db("read a run"))?;
        let Some(run) = run else { return Ok(None) };
        let mut stmt = c
            .prepare_cached("SELECT vm, snapshot, consistency, error, freeze_window_us, stall_us, host_window_us, virtual_bytes, bytes_read, new_bytes FROM vm_results WHERE run_id = ?1 ORDER BY vm")
            .map_err(self.db("read a run's VMs"))?;
        let vms = stmt
            .query_map(params![id], vm_row)
            .map_err(self.db("read a run's VMs"))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.db("read a run's VMs"))?;
        Ok(Some((run, vms)))
    }

    /// A VM's results, newest first.
    pub fn vm_history(&self, vm: &str, limit: u32) -> Result<Vec<VmRun>> {
        let c = self.reader();
        let mut stmt = c
            .prepare_cached(
                "SELECT v.vm, v.snapshot, v.consistency, v.error, v.freeze_window_us, v.stall_us, v.host_window_us, v.virtual_bytes, v.bytes_read, v.new_bytes, r.id, r.job, r.started_at, r.finished_at FROM vm_results v JOIN runs r ON r.id = v.run_id WHERE v.vm = ?1 ORDER BY r.id DESC LIMIT ?2",
            )
            .map_err(self.db("read a VM's history"))?;
        let rows = stmt
            .query_map(params![vm, limit], vm_run_row)
            .map_err(self.db("read a VM's history"))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.db("read a VM's history"));
        rows
    }
}

impl State {
    /// Every VM's latest result, in one query.
    pub fn latest_per_vm(&self) -> Result<std::collections::HashMap<String, VmRun>> {
        let c = self.reader();
        let mut stmt = c
            .prepare_cached(
                "SELECT v.vm, v.snapshot, v.consistency, v.error, v.freeze_window_us, v.stall_us, v.host_window_us, v.virtual_bytes, v.bytes_read, v.new_bytes, r.id, r.job, r.started_at, r.finished_at FROM vm_results v JOIN runs r ON r.id = v.run_id WHERE v.run_id = (SELECT MAX(w.run_id) FROM vm_results w WHERE w.vm = v.vm)",
            )
            .map_err(self.db("read each VM's latest result"))?;
        let rows = stmt
            .query_map([], vm_run_row)
            .map_err(self.db("read each VM's latest result"))?
            .map(|r| r.map(|v| (v.result.vm.clone(), v)))
            .collect::<std::result::Result<_, _>>()
            .map_err(self.db("read each VM's latest result"));
        rows
    }

    /// Every job's latest run, in one query.
    pub fn latest_per_job(&self) -> Result<std::collections::HashMap<String, Run>> {
        let c = self.reader();
        let mut stmt = c
            .prepare_cached(
                "SELECT id, job, kind, trigger, scheduled_for, started_at, finished_at, state, error, note, done_bytes, total_bytes FROM runs WHERE id IN (SELECT MAX(id) FROM runs GROUP BY job)",
            )
            .map_err(self.db("read each job's latest run"))?;
        let rows = stmt
            .query_map([], run_row)
            .map_err(self.db("read each job's latest run"))?
            .map(|r| r.map(|run| (run.job.clone(), run)))
            .collect::<std::result::Result<_, _>>()
            .map_err(self.db("read each job's latest run"));
        rows
    }

    /// Records that `snapshots` were verified now, and how it went.
    pub fn set_verified(&self, snapshots: &[String], ok: bool) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(self.db("record a verify"))?;
        let now = ms(Utc::now());
        for s in snapshots {
            tx.execute(
                "INSERT INTO verified (snapshot, at, ok) VALUES (?1, ?2, ?3) ON CONFLICT (snapshot) DO UPDATE SET at = excluded.at, ok = excluded.ok",
                params![s, now, ok],
            )
            .map_err(self.db("record a verify"))?;
        }
        tx.commit().map_err(self.db("record a verify"))
    }

    /// The snapshots verified successfully since `since`.
    pub fn verified_since(&self, since: DateTime<Utc>) -> Result<Vec<String>> {
        let c = self.reader();
        let mut stmt = c
            .prepare_cached("SELECT snapshot FROM verified WHERE ok AND at >= ?1")
            .map_err(self.db("read what was verified"))?;
        let rows = stmt
            .query_map(params![ms(since)], |r| r.get(0))
            .map_err(self.db("read what was verified"))?
            .collect::<std::result::Result<Vec<String>, _>>()
            .map_err(self.db("read what was verified"));
        rows
    }

    /// Every VM's totals, latest result and freeze-window histogram, in
    /// two queries whatever the number of runs.
    pub fn vm_stats(&self) -> Result<Vec<VmStats>> {
        let buckets: Vec<String> = FREEZE_BUCKETS
            .iter()
            .map(|b| format!("SUM(v.freeze_window_us <= {})", (b * 1e6) as u64))
            .collect();
        let sql = format!(
            "SELECT v.vm, SUM(v.error IS NOT NULL), SUM(v.bytes_read), SUM(v.new_bytes), MAX(CASE WHEN v.snapshot IS NOT NULL THEN r.finished_at END), COUNT(v.freeze_window_us), COALESCE(SUM(v.freeze_window_us), 0), {} FROM vm_results v JOIN runs r ON r.id = v.run_id GROUP BY v.vm ORDER BY v.vm",
            buckets.join(", ")
        );
        let c = self.reader();
        let mut stmt = c
            .prepare_cached(&sql)
            .map_err(self.db("sum each VM's runs"))?;
        let mut out: Vec<VmStats> = stmt
            .query_map([], |r| {
                let mut window_buckets = Vec::with_capacity(FREEZE_BUCKETS.len());
                for i in 0..FREEZE_BUCKETS.len() {
                    window_buckets.push(u(r.get::<_, Option<i64>>(7 + i)?.unwrap_or(0)));
                }
                Ok(VmStats {
                    vm: r.get(0)?,
                    failures: u(r.get(1)?),
                    bytes_read_total: u(r.get(2)?),
                    new_bytes_total: u(r.get(3)?),
                    last_success: r.get::<_, Option<i64>>(4)?.map(at),
                    window_count: u(r.get(5)?),
                    window_sum_us: u(r.get(6)?),
                    window_buckets,
                    ..VmStats::default()
                })
            })
            .map_err(self.db("sum each VM's runs"))?
            .collect::<std::result::Result<_, _>>()
            .map_err(self.db("sum each VM's runs"))?;
        let mut stmt = c
            .prepare_cached(
                "SELECT v.vm, v.freeze_window_us, v.stall_us, v.bytes_read, v.new_bytes, r.finished_at - r.started_at FROM vm_results v JOIN runs r ON r.id = v.run_id WHERE v.run_id = (SELECT MAX(w.run_id) FROM vm_results w WHERE w.vm = v.vm)",
            )
            .map_err(self.db("read each VM's latest result"))?;
        let latest = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?.map(u),
                    r.get::<_, Option<i64>>(2)?.map(u),
                    u(r.get(3)?),
                    u(r.get(4)?),
                    r.get::<_, Option<i64>>(5)?.map(u),
                ))
            })
            .map_err(self.db("read each VM's latest result"))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.db("read each VM's latest result"))?;
        for (vm, window, stall, read, new, took) in latest {
            if let Some(s) = out.iter_mut().find(|s| s.vm == vm) {
                s.last_freeze_window_us = window;
                s.last_stall_us = stall;
                s.last_bytes_read = read;
                s.last_new_bytes = new;
                s.last_run_ms = took;
            }
        }
        Ok(out)
    }
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
    Ok(Run {
        id: r.get(0)?,
        job: r.get(1)?,
        kind: r.get(2)?,
        trigger: r.get(3)?,
        scheduled_for: r.get::<_, Option<i64>>(4)?.map(at),
        started_at: at(r.get(5)?),
        finished_at: r.get::<_, Option<i64>>(6)?.map(at),
        state: r.get(7)?,
        error: r.get(8)?,
        note: r.get(9)?,
        done_bytes: u(r.get(10)?),
        total_bytes: u(r.get(11)?),
    })
}

/// A VM's result (columns as [`vm_row`]) and its run's id, job and times.
fn vm_run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRun> {
    Ok(VmRun {
        result: vm_row(r)?,
        run_id: r.get(10)?,
        job: r.get(11)?,
        started_at: at(r.get(12)?),
        finished_at: r.get::<_, Option<i64>>(13)?.map(at),
    })
}

fn vm_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmResult> {
    let opt = |v: Option<i64>| v.map(u);
    Ok(VmResult {
        vm: r.get(0)?,
        snapshot: r.get(1)?,
        consistency: r.get(2)?,
        error: r.get(3)?,
        freeze_window_us: opt(r.get(4)?),
        stall_us: opt(r.get(5)?),
        host_window_us: opt(r.get(6)?),
        virtual_bytes: u(r.get(7)?),
        bytes_read: u(r.get(8)?),
        new_bytes: u(r.get(9)?),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn runs_survive_a_restart_and_an_interrupted_one_is_failed_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (s, cut) = State::open(dir.path()).unwrap();
        assert!(cut.is_empty());
        let done = s
            .begin("nightly", "backup", Trigger::Schedule, Some(Utc::now()))
            .unwrap();
        s.progress(done, 10, 20).unwrap();
        let vm = VmResult {
            vm: "web1".into(),
            snapshot: Some("abc".into()),
            consistency: Some("app-consistent".into()),
            freeze_window_us: Some(1500),
            stall_us: Some(2000),
            bytes_read: 7,
            ..VmResult::default()
        };
        s.finish(
            done,
            RunState::Succeeded,
            None,
            Some("kept 3"),
            std::slice::from_ref(&vm),
        )
        .unwrap();
        let cut_short = s.begin("nightly", "backup", Trigger::Manual, None).unwrap();
        s.skip(
            "nightly",
            "backup",
            Trigger::Schedule,
            Some(Utc::now()),
            "its previous run is still going",
        )
        .unwrap();
        // Beside the service, an observer sees it running, and changes
        // nothing; a second service is refused.
        let o = State::observe(dir.path()).unwrap();
        assert_eq!(o.run(cut_short).unwrap().unwrap().0.state, "running");
        let e = State::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("another vsnap serve uses this state directory"),
            "{e}"
        );
        drop((s, o));

        let (s, cut) = State::open(dir.path()).unwrap();
        assert_eq!(cut, [cut_short]);
        let (run, vms) = s.run(cut_short).unwrap().unwrap();
        assert_eq!(run.state, "failed");
        assert!(run
            .error
            .unwrap()
            .contains("stopped while this run was in progress"));
        let (run, vms_done) = s.run(done).unwrap().unwrap();
        assert_eq!(
            (run.state.as_str(), run.done_bytes, run.total_bytes),
            ("succeeded", 10, 20)
        );
        assert_eq!(vms_done[0].stall_us, Some(2000));
        assert_eq!(run.note.as_deref(), Some("kept 3"));
        assert!(vms.is_empty());
        let all = s.runs(None, 10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].state, "skipped");
        assert_eq!(
            s.vm_history("web1", 10).unwrap()[0]
                .result
                .snapshot
                .as_deref(),
            Some("abc")
        );
        assert!(s.run(999).unwrap().is_none());
    }

    #[test]
    fn when_a_job_fired_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = State::open(dir.path()).unwrap();
        assert_eq!(s.last_fired("j").unwrap(), None);
        let t = DateTime::from_timestamp_millis(1_800_000_000_000).unwrap();
        s.set_fired("j", t).unwrap();
        s.set_fired("j", t).unwrap();
        drop(s);
        let (s, _) = State::open(dir.path()).unwrap();
        assert_eq!(s.last_fired("j").unwrap(), Some(t));
    }

    #[test]
    fn a_newer_schema_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        drop(State::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join("state.sqlite")).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = State::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("schema 99, newer than this vsnap's 1"), "{e}");
    }
}
