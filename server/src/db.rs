//! The server's state: one SQLite file (`DATA/server.db`), opened in WAL
//! mode with `synchronous=FULL` (a change the API acknowledged survives a
//! power cut), foreign keys on.
//!
//! The schema is versioned with `PRAGMA user_version`: [`MIGRATIONS`]`[i]`
//! takes a database from version `i` to `i + 1`, each in its own
//! transaction, so a crash during an upgrade leaves the last complete
//! version. A database newer than this binary is refused rather than
//! guessed at.
//!
//! [`Store`] is the one owner of the connection; the API's threads call its
//! methods, each a short transaction behind one mutex (the control plane
//! sees a few requests a second; SQLite serializes writers anyway).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use ferry_api::types::{
    DiskInfo, DiskReplication, Group, GroupPoint, Heartbeat, HostConfig, HostInfo, Job, JobLogLine,
    JobState, Plan, Policy, Protection, ProtectionState, Role, TargetInfo, TargetRef,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::{self, Event, Record};

/// Schema migrations; entry `i` upgrades version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: hosts, targets, policies, protections, tokens, jobs.
    "
    CREATE TABLE tokens (
        hash BLOB PRIMARY KEY,          -- SHA-256 of the token; the token itself is never stored
        role TEXT NOT NULL,             -- admin | host | target
        subject TEXT,                   -- the host or target name (NULL for admin)
        one_time INTEGER NOT NULL,      -- 1: a registration token
        name_bound TEXT,                -- a registration token's required name
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        used_at INTEGER
    );
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE targets (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE heartbeats (
        owner TEXT NOT NULL,            -- host or target name
        component TEXT NOT NULL,        -- filter | sidecar | target
        at INTEGER NOT NULL,
        status TEXT NOT NULL,           -- JSON as the daemon sent it
        PRIMARY KEY (owner, component)
    );
    CREATE TABLE disks (
        host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (host, name)
    );
    CREATE TABLE policies (
        name TEXT PRIMARY KEY,
        rpo_alert_secs INTEGER NOT NULL,
        retention_secs INTEGER NOT NULL,
        crash_interval_secs INTEGER NOT NULL,
        app_interval_secs INTEGER,
        compression_level INTEGER NOT NULL,
        bandwidth INTEGER NOT NULL
    );
    CREATE TABLE protections (
        host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
        disk TEXT NOT NULL,
        policy TEXT NOT NULL REFERENCES policies(name),
        target TEXT NOT NULL REFERENCES targets(name),
        state TEXT NOT NULL,
        before_failover TEXT,
        since INTEGER NOT NULL,
        reason TEXT NOT NULL,
        lag_secs INTEGER NOT NULL DEFAULT 0,
        resync_bytes INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (host, disk)
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        owner TEXT NOT NULL,            -- target:NAME | server
        state TEXT NOT NULL,
        progress REAL NOT NULL DEFAULT 0,
        params TEXT NOT NULL,
        result TEXT,
        error TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        lease_until INTEGER             -- a running job whose owner is silent past this fails
    );
    CREATE TABLE job_log (
        job INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        at INTEGER NOT NULL,
        line TEXT NOT NULL
    );
    CREATE INDEX job_log_by_job ON job_log(job);
    ",
    // 2: replication groups and their rounds; where a host's group port is.
    "
    ALTER TABLE hosts ADD COLUMN group_addr TEXT;
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        interval_secs INTEGER,
        timeout_ms INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE group_members (
        grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        PRIMARY KEY (grp, host)
    );
    CREATE TABLE group_points (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        result TEXT NOT NULL,
        at INTEGER NOT NULL,
        elapsed_us INTEGER,
        members TEXT NOT NULL
    );
    CREATE INDEX group_points_by_group ON group_points(grp, id);
    ",
    // 3: recovery plans; where a server-run job (a plan run) is.
    "
    CREATE TABLE plans (
        name TEXT PRIMARY KEY,
        body TEXT NOT NULL              -- the Plan as JSON
    );
    ALTER TABLE jobs ADD COLUMN cursor TEXT;
    ",
    // 4: app-consistent group points.
    "
    ALTER TABLE groups ADD COLUMN app_interval_secs INTEGER;
    ALTER TABLE group_points ADD COLUMN app INTEGER NOT NULL DEFAULT 0;
    ",
    // 5: failback. A policy's failback policy; a protection's other
    //    direction (the target and policy it had before a reprotect swapped
    //    them: forward while replicating back, back while forward again).
    "
    ALTER TABLE policies ADD COLUMN failback TEXT;
    ALTER TABLE protections ADD COLUMN other_target TEXT;
    ALTER TABLE protections ADD COLUMN other_policy TEXT;
    ",
];

/// How long a running job's owner may stay silent before the job fails.
pub const JOB_LEASE_SECS: i64 = 120;

/// How long a queued job waits for its owner to take it before it fails.
pub const JOB_CLAIM_SECS: i64 = 600;

/// Longest job log kept per job (older lines are dropped first).
pub const MAX_JOB_LOG_LINES: i64 = 1000;

/// The current Unix time in seconds.
pub fn now() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator.
    Admin,
    /// Host NAME.
    Host(String),
    /// Target NAME.
    Target(String),
}

/// A token row as registration reads it.
struct OneTimeToken {
    role: String,
    one_time: bool,
    bound: Option<String>,
    expires_at: Option<i64>,
    used_at: Option<i64>,
}

/// How a host job meets the lifecycle when it is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobGate {
    /// No lifecycle step (test failovers).
    Free,
    /// Take this step now (a failover starts).
    Start(Event),
    /// This step must be allowed now; it is taken when the job succeeds
    /// (a commit).
    Require(Event),
}

/// The server's database.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

fn sql_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| {
        Error::new(
            ErrorKind::Invalid,
            "store",
            format!("{what} {v} is too large"),
        )
    })
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn json_text(v: &serde_json::Value) -> String {
    v.to_string()
}

fn parse_json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
}

fn not_found(op: &'static str, what: String) -> Error {
    Error::new(ErrorKind::NotFound, op, what)
}

fn conflict(op: &'static str, what: String) -> Error {
    Error::new(ErrorKind::Conflict, op, what)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(Error::db("open database"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(Error::db("open database"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(Error::db("open database"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::new(
                ErrorKind::Db,
                "open database",
                format!("{}: journal mode {mode}, want wal", path.display()),
            ));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(Error::db("open database"))?;
        let mut store = Store {
            conn: Mutex::new(conn),
        };
        store.migrate(path)?;
        Ok(store)
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<usize> {
        let v: i64 = self
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(Error::db("schema version"))?;
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    }

    fn migrate(&mut self, path: &Path) -> Result<()> {
        let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(Error::db("read schema version"))?;
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version > MIGRATIONS.len() {
            return Err(Error::new(
                ErrorKind::Db,
                "open database",
                format!(
                    "{} has schema version {version}; this ferry knows up to {}: \
                     run a newer ferry",
                    path.display(),
                    MIGRATIONS.len()
                ),
            ));
        }
        for (from, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction().map_err(Error::db("migrate"))?;
            tx.execute_batch(sql).map_err(Error::db("migrate"))?;
            // PRAGMA takes no parameters; the number is ours.
            tx.execute_batch(&format!("PRAGMA user_version = {}", from + 1))
                .map_err(Error::db("migrate"))?;
            tx.commit().map_err(Error::db("migrate"))?;
            if version == 0 {
                tracing::debug!(version = from + 1, "database schema made");
            } else {
                tracing::info!(version = from + 1, "database schema upgraded");
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done change:
        // every change is a transaction that rolls back when dropped.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(Error::db(op))?;
        let out = f(&tx)?;
        tx.commit().map_err(Error::db(op))?;
        Ok(out)
    }

    // ---- tokens -------------------------------------------------------

    /// Stores a token by its hash.
    pub fn add_token(
        &self,
        hash: &[u8],
        role: Role,
        subject: Option<&str>,
        one_time: bool,
        name_bound: Option<&str>,
        expires_at: Option<i64>,
    ) -> Result<()> {
        self.write("add token", |tx| {
            tx.execute(
                "INSERT INTO tokens (hash, role, subject, one_time, name_bound, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![hash, role.as_str(), subject, one_time, name_bound, now(), expires_at],
            )
            .map_err(Error::db("add token"))?;
            Ok(())
        })
    }

    /// Whether an admin token exists.
    pub fn has_admin_token(&self) -> Result<bool> {
        self.lock()
            .query_row(
                "SELECT 1 FROM tokens WHERE role = 'admin' LIMIT 1",
                [],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(Error::db("read tokens"))
    }

    /// The principal of a bearer token (by its hash); None for an unknown,
    /// expired or one-time token.
    pub fn principal(&self, hash: &[u8]) -> Result<Option<Principal>> {
        let row: Option<(String, Option<String>, bool, Option<i64>)> = self
            .lock()
            .query_row(
                "SELECT role, subject, one_time, expires_at FROM tokens WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(Error::db("authenticate"))?;
        let Some((role, subject, one_time, expires_at)) = row else {
            return Ok(None);
        };
        if one_time || expires_at.is_some_and(|t| t < now()) {
            return Ok(None);
        }
        Ok(match (role.as_str(), subject) {
            ("admin", _) => Some(Principal::Admin),
            ("host", Some(name)) => Some(Principal::Host(name)),
            ("target", Some(name)) => Some(Principal::Target(name)),
            _ => None,
        })
    }

    /// Registers `name` in `role` with the one-time token `token_hash`:
    /// checks and uses the token, records the host or target, replaces its
    /// API tokens with `api_token_hash`, all in one transaction (a token is
    /// used at most once even when two registrations race). `issue` runs
    /// inside the transaction to make the credentials; if it fails nothing
    /// is recorded.
    pub fn register<T>(
        &self,
        token_hash: &[u8],
        role: Role,
        name: &str,
        address: Option<&str>,
        api_token_hash: &[u8],
        issue: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        const OP: &str = "register";
        self.write(OP, |tx| {
            let row = tx
                .query_row(
                    "SELECT role, one_time, name_bound, expires_at, used_at FROM tokens WHERE hash = ?1",
                    [token_hash],
                    |r| {
                        Ok(OneTimeToken {
                            role: r.get(0)?,
                            one_time: r.get(1)?,
                            bound: r.get(2)?,
                            expires_at: r.get(3)?,
                            used_at: r.get(4)?,
                        })
                    },
                )
                .optional()
                .map_err(Error::db(OP))?;
            let refused = |why: &str| Error::new(ErrorKind::Unauthenticated, OP, why.to_owned());
            let Some(OneTimeToken {
                role: token_role,
                one_time,
                bound,
                expires_at,
                used_at,
            }) = row
            else {
                return Err(refused("unknown registration token"));
            };
            if !one_time || token_role != role.as_str() {
                return Err(refused(&format!("this is not a {} registration token", role.as_str())));
            }
            if used_at.is_some() {
                return Err(refused("the registration token was already used"));
            }
            if expires_at.is_some_and(|t| t < now()) {
                return Err(refused("the registration token expired"));
            }
            if let Some(bound) = bound.as_ref().filter(|b| *b != name) {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    OP,
                    format!("the registration token is for {bound:?}, not {name:?}"),
                ));
            }
            // Hosts and targets share one credentials directory: one name,
            // one role. Taking over an existing registration (a reinstalled
            // host) hands out its keys: only with a token bound to its name.
            let known = |table: &str| -> Result<bool> {
                tx.query_row(&format!("SELECT 1 FROM {table} WHERE name = ?1"), [name], |_| Ok(()))
                    .optional()
                    .map(|o| o.is_some())
                    .map_err(Error::db(OP))
            };
            let (mine, other) = match role {
                Role::Host => ("hosts", "targets"),
                _ => ("targets", "hosts"),
            };
            if known(other)? {
                return Err(conflict(OP, format!("{name:?} is registered in another role")));
            }
            if known(mine)? && bound.is_none() {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    OP,
                    format!(
                        "{name:?} is registered already: registering it again needs a token \
                         bound to its name (`ferry {} token --name {name}`)",
                        role.as_str()
                    ),
                ));
            }
            tx.execute("UPDATE tokens SET used_at = ?1 WHERE hash = ?2", params![now(), token_hash])
                .map_err(Error::db(OP))?;
            match role {
                Role::Host => {
                    tx.execute(
                        "INSERT INTO hosts (name, registered_at) VALUES (?1, ?2)
                         ON CONFLICT(name) DO UPDATE SET registered_at = excluded.registered_at",
                        params![name, now()],
                    )
                    .map_err(Error::db(OP))?;
                }
                Role::Target => {
                    let address = address.ok_or_else(|| {
                        Error::new(ErrorKind::Invalid, OP, "a target registers with its address")
                    })?;
                    tx.execute(
                        "INSERT INTO targets (name, address, registered_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT(name) DO UPDATE SET address = excluded.address,
                             registered_at = excluded.registered_at",
                        params![name, address, now()],
                    )
                    .map_err(Error::db(OP))?;
                }
                Role::Admin => return Err(refused("admins do not register")),
            }
            // A re-registration (a reinstalled host) revokes the old tokens.
            tx.execute(
                "DELETE FROM tokens WHERE role = ?1 AND subject = ?2 AND one_time = 0",
                params![role.as_str(), name],
            )
            .map_err(Error::db(OP))?;
            tx.execute(
                "INSERT INTO tokens (hash, role, subject, one_time, created_at) VALUES (?1, ?2, ?3, 0, ?4)",
                params![api_token_hash, role.as_str(), name, now()],
            )
            .map_err(Error::db(OP))?;
            issue()
        })
    }

    // ---- hosts and targets --------------------------------------------

    /// Every host, by name.
    pub fn hosts(&self) -> Result<Vec<HostInfo>> {
        let names: Vec<String> = column(
            &self.lock(),
            "list hosts",
            "SELECT name FROM hosts ORDER BY name",
            [],
        )?;
        names.iter().map(|n| self.host(n)).collect()
    }

    /// One host with its heartbeats, disks and protections.
    pub fn host(&self, name: &str) -> Result<HostInfo> {
        const OP: &str = "read host";
        let conn = self.lock();
        let registered_at: i64 = conn
            .query_row(
                "SELECT registered_at FROM hosts WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(Error::db(OP))?
            .ok_or_else(|| not_found(OP, format!("no host {name:?}")))?;
        let heartbeats = heartbeats_of(&conn, name)?;
        let mut stmt = conn
            .prepare("SELECT name, size FROM disks WHERE host = ?1 ORDER BY name")
            .map_err(Error::db(OP))?;
        let disks = stmt
            .query_map([name], |r| {
                Ok(DiskInfo {
                    name: r.get(0)?,
                    size: from_i64(r.get(1)?),
                })
            })
            .map_err(Error::db(OP))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::db(OP))?;
        let protections = protections_of(&conn, Some(name))?;
        Ok(HostInfo {
            name: name.to_owned(),
            registered_at,
            heartbeats,
            disks,
            protections,
        })
    }

    /// Every target, by name.
    pub fn targets(&self) -> Result<Vec<TargetInfo>> {
        const OP: &str = "list targets";
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT name, address, registered_at FROM targets ORDER BY name")
            .map_err(Error::db(OP))?;
        let rows: Vec<(String, String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(Error::db(OP))?
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::db(OP))?;
        rows.into_iter()
            .map(|(name, address, registered_at)| {
                let heartbeat = heartbeats_of(&conn, &name)?
                    .into_iter()
                    .find(|h| h.component == ferry_api::types::Component::Target);
                Ok(TargetInfo {
                    name,
                    address,
                    registered_at,
                    heartbeat,
                })
            })
            .collect()
    }

    /// One target.
    pub fn target(&self, name: &str) -> Result<TargetInfo> {
        self.targets()?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| not_found("read target", format!("no target {name:?}")))
    }

    /// Records a heartbeat of `owner`'s `component`: its status, the disks
    /// a filter saw, and what a sidecar says of each protected disk (fed to
    /// the lifecycle). Returns the protections whose state changed.
    pub fn heartbeat(
        &self,
        owner: &str,
        component: ferry_api::types::Component,
        disks: &[DiskInfo],
        replication: &[DiskReplication],
        status: &serde_json::Value,
    ) -> Result<Vec<Protection>> {
        const OP: &str = "heartbeat";
        self.write(OP, |tx| {
            tx.execute(
                "INSERT INTO heartbeats (owner, component, at, status) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(owner, component) DO UPDATE SET at = excluded.at, status = excluded.status",
                params![owner, component.as_str(), now(), json_text(status)],
            )
            .map_err(Error::db(OP))?;
            if component == ferry_api::types::Component::Filter {
                record_disks(tx, owner, disks)?;
            }
            if component == ferry_api::types::Component::Target {
                // A target alive and busy with one job keeps its queue.
                tx.execute(
                    "UPDATE jobs SET lease_until = ?1 WHERE owner = ?2 AND state = 'queued'",
                    params![now() + JOB_CLAIM_SECS, format!("target:{owner}")],
                )
                .map_err(Error::db(OP))?;
            }
            let mut changed = Vec::new();
            for rep in replication {
                tx.execute(
                    "UPDATE protections SET lag_secs = ?1, resync_bytes = ?2 WHERE host = ?3 AND disk = ?4",
                    params![sql_i64(rep.lag_secs, "lag")?, sql_i64(rep.resync_bytes, "resync bytes")?, owner, rep.disk],
                )
                .map_err(Error::db(OP))?;
                let event = Event::Report {
                    shipping: rep.shipping,
                    consistent: rep.consistent,
                };
                if let Some(p) = transition_in(tx, owner, &rep.disk, event, true)? {
                    changed.push(p);
                }
            }
            Ok(changed)
        })
    }

    /// Replaces the disks `host` reported: new ones added, sizes updated,
    /// ones no longer there and not protected removed.
    pub fn heartbeat_disks(&self, host: &str, disks: &[DiskInfo]) -> Result<()> {
        self.write("record disks", |tx| record_disks(tx, host, disks))
    }

    // ---- policies -----------------------------------------------------

    /// Creates a policy and, with it, its failback policy `NAME-failback`
    /// ([`Policy::failback_of`]); a taken name (either) is a conflict.
    pub fn create_policy(&self, p: &Policy) -> Result<()> {
        const OP: &str = "create policy";
        if let Some(why) = p.problem() {
            return Err(Error::new(ErrorKind::Invalid, OP, why));
        }
        let back = Policy::failback_of(p);
        self.write(OP, |tx| {
            for (policy, failback) in [(&back, None), (p, Some(back.name.as_str()))] {
                let n = insert_policy(tx, policy, failback)?;
                if n == 0 {
                    return Err(conflict(OP, format!("a policy {:?} exists", policy.name)));
                }
            }
            Ok(())
        })
    }

    /// Changes a policy's settings (not its name or failback link); the
    /// sidecars replicating under it pick them up with their next plan.
    pub fn update_policy(&self, p: &Policy) -> Result<Policy> {
        const OP: &str = "change policy";
        if let Some(why) = p.problem() {
            return Err(Error::new(ErrorKind::Invalid, OP, why));
        }
        self.write(OP, |tx| {
            let n = tx
                .execute(
                    "UPDATE policies SET rpo_alert_secs = ?2, retention_secs = ?3,
                         crash_interval_secs = ?4, app_interval_secs = ?5,
                         compression_level = ?6, bandwidth = ?7
                     WHERE name = ?1",
                    params![
                        p.name,
                        sql_i64(p.rpo_alert_secs, "rpo")?,
                        sql_i64(p.retention_secs, "retention")?,
                        sql_i64(p.crash_interval_secs, "crash interval")?,
                        p.app_interval_secs
                            .map(|v| sql_i64(v, "app interval"))
                            .transpose()?,
                        p.compression_level,
                        sql_i64(p.bandwidth, "bandwidth")?
                    ],
                )
                .map_err(Error::db(OP))?;
            if n == 0 {
                return Err(not_found(OP, format!("no policy {:?}", p.name)));
            }
            Ok(())
        })?;
        self.policy(&p.name)
    }

    /// Every policy, by name.
    pub fn policies(&self) -> Result<Vec<Policy>> {
        const OP: &str = "list policies";
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT name, rpo_alert_secs, retention_secs, crash_interval_secs, app_interval_secs,
                        compression_level, bandwidth, failback FROM policies ORDER BY name",
            )
            .map_err(Error::db(OP))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Policy {
                    name: r.get(0)?,
                    rpo_alert_secs: from_i64(r.get(1)?),
                    retention_secs: from_i64(r.get(2)?),
                    crash_interval_secs: from_i64(r.get(3)?),
                    app_interval_secs: r.get::<_, Option<i64>>(4)?.map(from_i64),
                    compression_level: r.get(5)?,
                    bandwidth: from_i64(r.get(6)?),
                    failback: r.get(7)?,
                })
            })
            .map_err(Error::db(OP))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db(OP))
    }

    /// One policy.
    pub fn policy(&self, name: &str) -> Result<Policy> {
        self.policies()?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| not_found("read policy", format!("no policy {name:?}")))
    }

    // ---- protections --------------------------------------------------

    /// Protects `disks` of `host` (empty: every disk it reported) under
    /// `policy` to `target`. A disk already protected keeps its state if
    /// policy and target are the same; another policy or target for a
    /// replicating disk replaces them; a disk in a failover state is a
    /// conflict.
    pub fn protect(
        &self,
        host: &str,
        disks: &[String],
        policy: &str,
        target: &str,
    ) -> Result<Vec<Protection>> {
        const OP: &str = "protect";
        self.write(OP, |tx| {
            let exists = |sql: &str, key: &str| -> Result<bool> {
                tx.query_row(sql, [key], |_| Ok(()))
                    .optional()
                    .map(|o| o.is_some())
                    .map_err(Error::db(OP))
            };
            if !exists("SELECT 1 FROM hosts WHERE name = ?1", host)? {
                return Err(not_found(OP, format!("no host {host:?}")));
            }
            if !exists("SELECT 1 FROM policies WHERE name = ?1", policy)? {
                return Err(not_found(OP, format!("no policy {policy:?}")));
            }
            if !exists("SELECT 1 FROM targets WHERE name = ?1", target)? {
                return Err(not_found(OP, format!("no target {target:?}")));
            }
            let reported: Vec<String> = column(tx, OP, "SELECT name FROM disks WHERE host = ?1 ORDER BY name", [host])?;
            let chosen: Vec<String> = if disks.is_empty() {
                if reported.is_empty() {
                    return Err(conflict(
                        OP,
                        format!("host {host:?} has reported no disks yet: start its filter, or name the disks"),
                    ));
                }
                reported
            } else {
                disks.to_vec()
            };
            for disk in &chosen {
                if disk.is_empty() || disk.len() > 64 {
                    return Err(Error::new(ErrorKind::Invalid, OP, format!("bad disk name {disk:?}")));
                }
                let current: Option<String> = tx
                    .query_row(
                        "SELECT state FROM protections WHERE host = ?1 AND disk = ?2",
                        [host, disk.as_str()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(Error::db(OP))?;
                match current.as_deref().and_then(ProtectionState::parse) {
                    None => {
                        tx.execute(
                            "INSERT INTO protections (host, disk, policy, target, state, since, reason)
                             VALUES (?1, ?2, ?3, ?4, 'enabling', ?5, 'protection requested')",
                            params![host, disk, policy, target, now()],
                        )
                        .map_err(Error::db(OP))?;
                    }
                    Some(state) if state.is_replicating() => {
                        // Another target holds nothing of this disk yet: it
                        // starts over there.
                        tx.execute(
                            "UPDATE protections SET policy = ?1,
                                 state = CASE WHEN target = ?2 THEN state ELSE 'enabling' END,
                                 reason = CASE WHEN target = ?2 THEN reason ELSE 'moved to another target' END,
                                 since = CASE WHEN target = ?2 THEN since ELSE ?5 END,
                                 target = ?2
                             WHERE host = ?3 AND disk = ?4",
                            params![policy, target, host, disk, now()],
                        )
                        .map_err(Error::db(OP))?;
                    }
                    Some(state) => {
                        return Err(conflict(
                            OP,
                            format!("{host}/{disk} is {}: protect it again after failback", state.as_str()),
                        ))
                    }
                }
            }
            // One target and one policy per host: the sidecar ships every
            // disk to one place under one schedule.
            let others: Vec<String> = column(
                tx,
                OP,
                "SELECT disk FROM protections WHERE host = ?1 AND (policy != ?2 OR target != ?3)
                   AND state NOT IN ('enabling', 'initial-sync', 'protected', 'resync-required')",
                params![host, policy, target],
            )?;
            if let Some(disk) = others.first() {
                return Err(conflict(
                    OP,
                    format!("{host}/{disk} is failed over under another policy or target: fail back first"),
                ));
            }
            tx.execute(
                "UPDATE protections SET policy = ?1,
                     state = CASE WHEN target = ?2 THEN state ELSE 'enabling' END,
                     reason = CASE WHEN target = ?2 THEN reason ELSE 'moved to another target' END,
                     since = CASE WHEN target = ?2 THEN since ELSE ?4 END,
                     target = ?2
                 WHERE host = ?3",
                params![policy, target, host, now()],
            )
            .map_err(Error::db(OP))?;
            protections_of(tx, Some(host))
        })
    }

    /// What host `host`'s daemons should do.
    pub fn host_config(&self, host: &str) -> Result<HostConfig> {
        self.host(host)?;
        let protections = self.protections(Some(host))?;
        let Some(first) = protections.first() else {
            return Ok(HostConfig {
                host: host.to_owned(),
                target: None,
                policy: None,
                protections,
            });
        };
        let t = self.target(&first.target)?;
        let policy = self.policy(&first.policy)?;
        Ok(HostConfig {
            host: host.to_owned(),
            target: Some(TargetRef {
                name: t.name,
                address: t.address,
            }),
            policy: Some(policy),
            protections,
        })
    }

    /// The hosts protected to `target`.
    pub fn hosts_of_target(&self, target: &str) -> Result<Vec<String>> {
        column(
            &self.lock(),
            "hosts of target",
            "SELECT DISTINCT host FROM protections WHERE target = ?1 ORDER BY host",
            [target],
        )
    }

    /// Queues job `kind` on host `host`'s target, gated by the lifecycle of
    /// the host's disks in the same transaction: the job exists exactly
    /// when its step was allowed.
    pub fn create_host_job(
        &self,
        host: &str,
        kind: &str,
        params: &serde_json::Value,
        gate: JobGate,
    ) -> Result<Job> {
        let mut jobs = self.create_host_jobs(&[HostJob {
            host,
            kind,
            params: params.clone(),
            gate,
        }])?;
        jobs.pop()
            .ok_or_else(|| Error::new(ErrorKind::Db, "create job", "no job created"))
    }

    /// Queues several host jobs in one transaction: all or none (a group
    /// failover moves every member or none).
    pub fn create_host_jobs(&self, jobs: &[HostJob<'_>]) -> Result<Vec<Job>> {
        self.write("create job", |tx| {
            jobs.iter().map(|j| queue_host_job(tx, j)).collect()
        })
    }

    /// Gives every running job a fresh lease: called when the server
    /// starts, so that owners who kept working while it was down get to
    /// report before the janitor judges them.
    pub fn renew_running_leases(&self) -> Result<usize> {
        self.write("renew leases", |tx| {
            tx.execute(
                "UPDATE jobs SET lease_until = CASE state WHEN 'running' THEN ?1 ELSE ?2 END
                 WHERE state IN ('running', 'queued') AND owner != 'server'",
                [now() + JOB_LEASE_SECS, now() + JOB_CLAIM_SECS],
            )
            .map_err(Error::db("renew leases"))
        })
    }

    /// Queues the reprotect of `host` (every disk committed after a
    /// failover, or failed back) in one transaction with its lifecycle step
    /// and the swap of directions: the protection's target and policy
    /// become the other direction's (kept in `other_target`,
    /// `other_policy`), and the ones it had become the other direction.
    ///
    /// From committed (replicating back): the target is `target` (or the
    /// other direction's, when a previous round trip left one), the policy
    /// the failback policy of the current one. From failed back (forward
    /// again): the other direction's target (or `target`) and policy. The
    /// job (`reprotect`, with `params`) goes to the new target.
    pub fn reprotect_host(
        &self,
        host: &str,
        target: Option<&str>,
        params: &serde_json::Value,
    ) -> Result<Job> {
        const OP: &str = "reprotect";
        self.write(OP, |tx| {
            let rows = directions_of(tx, host)?;
            let Some(first) = rows.first() else {
                return Err(not_found(OP, format!("host {host:?} has no protected disk")));
            };
            let back = first.state == ProtectionState::Committed;
            let (new_target, new_policy) = if back {
                let t = target
                    .map(str::to_owned)
                    .or_else(|| first.other_target.clone())
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Invalid,
                            OP,
                            format!("say which target receives {host}'s stream back (--target: the primary site's)"),
                        )
                    })?;
                let failback: Option<String> = tx
                    .query_row(
                        "SELECT failback FROM policies WHERE name = ?1",
                        [&first.policy],
                        |r| r.get(0),
                    )
                    .map_err(Error::db(OP))?;
                (t, failback.unwrap_or_else(|| first.policy.clone()))
            } else {
                let t = target
                    .map(str::to_owned)
                    .or_else(|| first.other_target.clone());
                match (t, first.other_policy.clone()) {
                    (Some(t), Some(p)) => (t, p),
                    _ => {
                        return Err(conflict(
                            OP,
                            format!("{host} has no forward direction recorded: protect it with `ferry protect`"),
                        ))
                    }
                }
            };
            let target_known = tx
                .query_row("SELECT 1 FROM targets WHERE name = ?1", [&new_target], |_| Ok(()))
                .optional()
                .map_err(Error::db(OP))?
                .is_some();
            if !target_known {
                return Err(not_found(OP, format!("no target {new_target:?}")));
            }
            transition_host_in(tx, host, Event::Reprotect, false)?;
            tx.execute(
                "UPDATE protections SET other_target = target, other_policy = policy,
                     target = ?2, policy = ?3
                 WHERE host = ?1",
                params![host, new_target, new_policy],
            )
            .map_err(Error::db(OP))?;
            queue_host_job(
                tx,
                &HostJob {
                    host,
                    kind: "reprotect",
                    params: params.clone(),
                    gate: JobGate::Free,
                },
            )
        })
    }

    /// Every protection (of `host`, or of every host).
    pub fn protections(&self, host: Option<&str>) -> Result<Vec<Protection>> {
        protections_of(&self.lock(), host)
    }

    /// Feeds `event` to every protected disk of `host`; all or nothing.
    pub fn transition_host(&self, host: &str, event: Event) -> Result<Vec<Protection>> {
        const OP: &str = "change protection state";
        self.write(OP, |tx| {
            let disks: Vec<String> = column(
                tx,
                OP,
                "SELECT disk FROM protections WHERE host = ?1 ORDER BY disk",
                [host],
            )?;
            if disks.is_empty() {
                return Err(not_found(
                    OP,
                    format!("host {host:?} has no protected disk"),
                ));
            }
            transition_host_in(tx, host, event, false)
        })
    }

    // ---- groups -------------------------------------------------------

    /// Records where host `host`'s group port is.
    pub fn set_group_addr(&self, host: &str, addr: Option<&str>) -> Result<()> {
        self.write("record group port", |tx| {
            tx.execute(
                "UPDATE hosts SET group_addr = ?1 WHERE name = ?2",
                params![addr, host],
            )
            .map_err(Error::db("record group port"))?;
            Ok(())
        })
    }

    /// Where host `host`'s group port is, if it reported one.
    pub fn group_addr(&self, host: &str) -> Result<Option<String>> {
        self.lock()
            .query_row(
                "SELECT group_addr FROM hosts WHERE name = ?1",
                [host],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(Error::db("read group port"))
    }

    /// Creates a group (a taken name is a conflict) with `g.hosts`.
    pub fn create_group(&self, g: &Group) -> Result<()> {
        const OP: &str = "create group";
        self.write(OP, |tx| {
            let n = tx
                .execute(
                    "INSERT INTO groups (name, interval_secs, timeout_ms, created_at, app_interval_secs)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(name) DO NOTHING",
                    params![
                        g.name,
                        g.interval_secs
                            .map(|v| sql_i64(v, "interval"))
                            .transpose()?,
                        sql_i64(g.timeout_ms, "timeout")?,
                        now(),
                        g.app_interval_secs
                            .map(|v| sql_i64(v, "app interval"))
                            .transpose()?
                    ],
                )
                .map_err(Error::db(OP))?;
            if n == 0 {
                return Err(conflict(OP, format!("a group {:?} exists", g.name)));
            }
            add_members(tx, &g.name, &g.hosts)
        })
    }

    /// Adds hosts to a group.
    pub fn add_group_hosts(&self, group: &str, hosts: &[String]) -> Result<()> {
        self.write("add group hosts", |tx| {
            group_in(tx, group)?;
            add_members(tx, group, hosts)
        })
    }

    /// Every group.
    pub fn groups(&self) -> Result<Vec<Group>> {
        let conn = self.lock();
        let names: Vec<String> = column(
            &conn,
            "list groups",
            "SELECT name FROM groups ORDER BY name",
            [],
        )?;
        names.iter().map(|n| group_in(&conn, n)).collect()
    }

    /// One group.
    pub fn group(&self, name: &str) -> Result<Group> {
        group_in(&self.lock(), name)
    }

    /// Records a round.
    pub fn add_group_point(&self, p: &GroupPoint) -> Result<GroupPoint> {
        const OP: &str = "record group point";
        self.write(OP, |tx| {
            tx.execute(
                "INSERT INTO group_points (grp, name, result, at, elapsed_us, members, app)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    p.group,
                    p.name,
                    p.result,
                    p.at,
                    p.elapsed_us.map(|v| sql_i64(v, "elapsed")).transpose()?,
                    json_text(&p.members),
                    p.app
                ],
            )
            .map_err(Error::db(OP))?;
            Ok(GroupPoint {
                id: tx.last_insert_rowid(),
                ..p.clone()
            })
        })
    }

    /// A group's rounds, newest first (at most `limit`).
    pub fn group_points(&self, group: &str, limit: u32) -> Result<Vec<GroupPoint>> {
        const OP: &str = "list group points";
        let conn = self.lock();
        group_in(&conn, group)?;
        let mut stmt = conn
            .prepare(
                "SELECT id, grp, name, result, at, elapsed_us, members, app FROM group_points
                 WHERE grp = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(Error::db(OP))?;
        let rows = stmt
            .query_map(params![group, limit], |r| {
                Ok(GroupPoint {
                    id: r.get(0)?,
                    group: r.get(1)?,
                    name: r.get(2)?,
                    result: r.get(3)?,
                    at: r.get(4)?,
                    elapsed_us: r.get::<_, Option<i64>>(5)?.map(from_i64),
                    members: parse_json(&r.get::<_, String>(6)?),
                    app: r.get(7)?,
                })
            })
            .map_err(Error::db(OP))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db(OP))
    }

    // ---- plans --------------------------------------------------------

    /// Creates a plan (a taken name is a conflict).
    pub fn create_plan(&self, plan: &Plan) -> Result<()> {
        const OP: &str = "create plan";
        let body = serde_json::to_string(plan)
            .map_err(|e| Error::new(ErrorKind::Invalid, OP, e.to_string()))?;
        self.write(OP, |tx| {
            let n = tx
                .execute(
                    "INSERT INTO plans (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
                    params![plan.name, body],
                )
                .map_err(Error::db(OP))?;
            if n == 0 {
                return Err(conflict(OP, format!("a plan {:?} exists", plan.name)));
            }
            Ok(())
        })
    }

    /// Every plan.
    pub fn plans(&self) -> Result<Vec<Plan>> {
        let bodies: Vec<String> = column(
            &self.lock(),
            "list plans",
            "SELECT body FROM plans ORDER BY name",
            [],
        )?;
        bodies
            .iter()
            .map(|b| {
                serde_json::from_str(b)
                    .map_err(|e| Error::new(ErrorKind::Db, "read plan", e.to_string()))
            })
            .collect()
    }

    /// One plan.
    pub fn plan(&self, name: &str) -> Result<Plan> {
        self.plans()?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| not_found("read plan", format!("no plan {name:?}")))
    }

    /// The server's own jobs (plan runs) not ended yet, oldest first, with
    /// their cursors.
    pub fn server_jobs(&self) -> Result<Vec<(Job, serde_json::Value)>> {
        const OP: &str = "server jobs";
        let conn = self.lock();
        let ids: Vec<i64> = column(
            &conn,
            OP,
            "SELECT id FROM jobs WHERE owner = 'server' AND state IN ('queued', 'running') ORDER BY id",
            [],
        )?;
        ids.into_iter()
            .map(|id| {
                let cursor: Option<String> = conn
                    .query_row("SELECT cursor FROM jobs WHERE id = ?1", [id], |r| r.get(0))
                    .map_err(Error::db(OP))?;
                Ok((
                    job_in(&conn, id, false)?,
                    cursor
                        .as_deref()
                        .map_or(serde_json::Value::Null, parse_json),
                ))
            })
            .collect()
    }

    /// Moves server job `id` on: its new cursor, progress and log lines,
    /// and the host jobs it starts, in one transaction (a restart finds
    /// either both or neither); the cursor's `children` become the ids of
    /// the jobs queued, if any. Returns the jobs queued.
    pub fn advance_server_job(
        &self,
        id: i64,
        cursor: &serde_json::Value,
        progress: f64,
        log: &[String],
        start: &[HostJob<'_>],
    ) -> Result<Vec<Job>> {
        const OP: &str = "advance job";
        self.write(OP, |tx| {
            // A run cancelled meanwhile stays ended and starts nothing.
            if job_in(tx, id, false)?.state.is_final() {
                return Err(conflict(OP, format!("job {id} has ended")));
            }
            let queued: Vec<Job> = start
                .iter()
                .map(|j| queue_host_job(tx, j))
                .collect::<Result<_>>()?;
            let mut cursor = cursor.clone();
            if !queued.is_empty() {
                // The jobs to wait for are in the cursor the moment they exist.
                cursor["children"] = queued.iter().map(|j| j.id).collect();
            }
            tx.execute(
                "UPDATE jobs SET cursor = ?1, progress = ?2, state = 'running',
                     started_at = COALESCE(started_at, ?3) WHERE id = ?4 AND owner = 'server'",
                params![json_text(&cursor), progress.clamp(0.0, 1.0), now(), id],
            )
            .map_err(Error::db(OP))?;
            for line in log {
                add_log(tx, id, line)?;
            }
            Ok(queued)
        })
    }

    /// Ends server job `id` (a plan run).
    pub fn finish_server_job(
        &self,
        id: i64,
        result: Option<&serde_json::Value>,
        error: Option<&str>,
    ) -> Result<Job> {
        self.write("finish job", |tx| {
            let job = job_in(tx, id, false)?;
            if job.state.is_final() {
                // Cancelled meanwhile: the operator's word stands.
                return Ok(job);
            }
            end_job(tx, &job, result, error)?;
            job_in(tx, id, false)
        })
    }

    /// Cancels job `id`: a plan run (whatever step it is at: the jobs it
    /// queued run on) or a job its target has not taken yet. A running
    /// target job cannot be taken back. `on_end` as in
    /// [`Store::finish_job`].
    pub fn cancel_job(
        &self,
        id: i64,
        on_end: impl FnOnce(&Transaction<'_>, &Job) -> Result<()>,
    ) -> Result<Job> {
        const OP: &str = "cancel job";
        self.write(OP, |tx| {
            let job = job_in(tx, id, false)?;
            let cancellable = match job.state {
                JobState::Queued => true,
                JobState::Running => job.owner == "server",
                _ => false,
            };
            if !cancellable {
                return Err(conflict(
                    OP,
                    format!(
                        "job {id} is {} on {}: it cannot be cancelled now",
                        job.state.as_str(),
                        job.owner
                    ),
                ));
            }
            end_job(tx, &job, None, Some("cancelled by the operator"))?;
            let job = job_in(tx, id, false)?;
            on_end(tx, &job)?;
            Ok(job)
        })
    }

    /// The operator's go-ahead for a plan run waiting at a manual step.
    pub fn continue_job(&self, id: i64) -> Result<Job> {
        const OP: &str = "continue job";
        self.write(OP, |tx| {
            let job = job_in(tx, id, false)?;
            let cursor: Option<String> = tx
                .query_row("SELECT cursor FROM jobs WHERE id = ?1", [id], |r| r.get(0))
                .map_err(Error::db(OP))?;
            let mut cursor = cursor
                .as_deref()
                .map_or(serde_json::Value::Null, parse_json);
            if job.owner != "server"
                || job.state != JobState::Running
                || cursor["phase"] != "manual"
            {
                return Err(conflict(
                    OP,
                    format!("job {id} is not waiting for the operator"),
                ));
            }
            cursor["continued"] = serde_json::Value::Bool(true);
            tx.execute(
                "UPDATE jobs SET cursor = ?1 WHERE id = ?2",
                params![json_text(&cursor), id],
            )
            .map_err(Error::db(OP))?;
            add_log(tx, id, "the operator continued")?;
            job_in(tx, id, false)
        })
    }

    // ---- jobs ---------------------------------------------------------

    /// Queues a job for `owner` (`target:NAME` or `server`).
    pub fn create_job(
        &self,
        kind: &str,
        subject: &str,
        owner: &str,
        params: &serde_json::Value,
    ) -> Result<i64> {
        self.write("create job", |tx| {
            tx.execute(
                "INSERT INTO jobs (kind, subject, owner, state, params, created_at)
                 VALUES (?1, ?2, ?3, 'queued', ?4, ?5)",
                params![kind, subject, owner, json_text(params), now()],
            )
            .map_err(Error::db("create job"))?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Jobs, newest first (at most `limit`).
    pub fn jobs(&self, limit: u32) -> Result<Vec<Job>> {
        const OP: &str = "list jobs";
        let ids: Vec<i64> = column(
            &self.lock(),
            OP,
            "SELECT id FROM jobs ORDER BY id DESC LIMIT ?1",
            [limit],
        )?;
        ids.into_iter().map(|id| self.job(id, false)).collect()
    }

    /// One job (with its log when `with_log`).
    pub fn job(&self, id: i64, with_log: bool) -> Result<Job> {
        let conn = self.lock();
        job_in(&conn, id, with_log)
    }

    /// Gives `owner` its oldest queued job, now running under a lease.
    pub fn claim_job(&self, owner: &str) -> Result<Option<Job>> {
        const OP: &str = "claim job";
        self.write(OP, |tx| {
            let id: Option<i64> = tx
                .query_row(
                    "SELECT id FROM jobs WHERE owner = ?1 AND state = 'queued' ORDER BY id LIMIT 1",
                    [owner],
                    |r| r.get(0),
                )
                .optional()
                .map_err(Error::db(OP))?;
            let Some(id) = id else { return Ok(None) };
            tx.execute(
                "UPDATE jobs SET state = 'running', started_at = ?1, lease_until = ?2 WHERE id = ?3",
                params![now(), now() + JOB_LEASE_SECS, id],
            )
            .map_err(Error::db(OP))?;
            add_log(tx, id, &format!("taken by {owner}"))?;
            job_in(tx, id, false).map(Some)
        })
    }

    /// Progress and log lines of a running job from its owner; renews the
    /// lease.
    pub fn job_progress(
        &self,
        id: i64,
        owner: &str,
        progress: Option<f64>,
        log: &[String],
    ) -> Result<Job> {
        const OP: &str = "job progress";
        self.write(OP, |tx| {
            let job = running_job_of(tx, id, owner, OP)?;
            let p = progress.map_or(job.progress, |p| p.clamp(0.0, 1.0));
            tx.execute(
                "UPDATE jobs SET progress = ?1, lease_until = ?2 WHERE id = ?3",
                params![p, now() + JOB_LEASE_SECS, id],
            )
            .map_err(Error::db(OP))?;
            for line in log {
                add_log(tx, id, line)?;
            }
            job_in(tx, id, false)
        })
    }

    /// Ends a running job: succeeded with `result`, or failed with `error`.
    /// `on_end` runs in the same transaction (the lifecycle follows the job).
    pub fn finish_job(
        &self,
        id: i64,
        owner: &str,
        result: Option<&serde_json::Value>,
        error: Option<&str>,
        on_end: impl FnOnce(&Transaction<'_>, &Job) -> Result<()>,
    ) -> Result<Job> {
        const OP: &str = "finish job";
        self.write(OP, |tx| {
            let job = running_job_of(tx, id, owner, OP)?;
            end_job(tx, &job, result, error)?;
            let job = job_in(tx, id, false)?;
            on_end(tx, &job)?;
            Ok(job)
        })
    }

    /// Fails every running job whose owner has been silent past its lease
    /// (a target that died mid-job); `on_end` as in [`Store::finish_job`].
    /// Returns the jobs it failed.
    pub fn expire_jobs(
        &self,
        on_end: impl Fn(&Transaction<'_>, &Job) -> Result<()>,
    ) -> Result<Vec<Job>> {
        const OP: &str = "expire jobs";
        self.write(OP, |tx| {
            let ids: Vec<i64> = column(
                tx,
                OP,
                "SELECT id FROM jobs WHERE state = 'running' AND lease_until < ?1",
                [now()],
            )?;
            let mut out = Vec::new();
            for id in ids {
                let job = job_in(tx, id, false)?;
                let why = format!("{} stopped reporting: the job's lease ran out", job.owner);
                end_job(tx, &job, None, Some(&why))?;
                let job = job_in(tx, id, false)?;
                on_end(tx, &job)?;
                out.push(job);
            }
            let unclaimed: Vec<i64> = column(
                tx,
                OP,
                "SELECT id FROM jobs WHERE state = 'queued' AND owner != 'server'
                   AND COALESCE(lease_until, created_at + ?2) < ?1",
                [now(), JOB_CLAIM_SECS],
            )?;
            for id in unclaimed {
                let job = job_in(tx, id, false)?;
                let why = format!(
                    "{} was silent for {JOB_CLAIM_SECS} s and did not take the job",
                    job.owner
                );
                end_job(tx, &job, None, Some(&why))?;
                let job = job_in(tx, id, false)?;
                on_end(tx, &job)?;
                out.push(job);
            }
            Ok(out)
        })
    }
}

/// The first column of every row of `sql`.
fn column<T: rusqlite::types::FromSql>(
    conn: &Connection,
    op: &'static str,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare(sql).map_err(Error::db(op))?;
    let rows = stmt
        .query_map(params, |r| r.get(0))
        .map_err(Error::db(op))?;
    rows.collect::<std::result::Result<_, _>>()
        .map_err(Error::db(op))
}

fn group_in(conn: &Connection, name: &str) -> Result<Group> {
    const OP: &str = "read group";
    let row: Option<(Option<i64>, i64, Option<i64>)> = conn
        .query_row(
            "SELECT interval_secs, timeout_ms, app_interval_secs FROM groups WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(Error::db(OP))?;
    let Some((interval, timeout, app_interval)) = row else {
        return Err(not_found(OP, format!("no group {name:?}")));
    };
    let hosts = column(
        conn,
        OP,
        "SELECT host FROM group_members WHERE grp = ?1 ORDER BY position",
        [name],
    )?;
    Ok(Group {
        name: name.to_owned(),
        hosts,
        interval_secs: interval.map(from_i64),
        timeout_ms: from_i64(timeout),
        app_interval_secs: app_interval.map(from_i64),
    })
}

fn add_members(tx: &Transaction<'_>, group: &str, hosts: &[String]) -> Result<()> {
    const OP: &str = "add group hosts";
    for host in hosts {
        let known = tx
            .query_row("SELECT 1 FROM hosts WHERE name = ?1", [host], |_| Ok(()))
            .optional()
            .map_err(Error::db(OP))?;
        if known.is_none() {
            return Err(not_found(OP, format!("no host {host:?}")));
        }
        tx.execute(
            "INSERT INTO group_members (grp, host, position)
             VALUES (?1, ?2, (SELECT COALESCE(MAX(position), 0) + 1 FROM group_members WHERE grp = ?1))
             ON CONFLICT(grp, host) DO NOTHING",
            params![group, host],
        )
        .map_err(Error::db(OP))?;
    }
    Ok(())
}

/// A job on a host's target, with how it meets the lifecycle.
#[derive(Debug, Clone)]
pub struct HostJob<'a> {
    /// The host.
    pub host: &'a str,
    /// The job's kind.
    pub kind: &'a str,
    /// Its parameters.
    pub params: serde_json::Value,
    /// Its lifecycle gate.
    pub gate: JobGate,
}

/// A protection's state, policy and other direction (for a reprotect).
struct Direction {
    state: ProtectionState,
    policy: String,
    other_target: Option<String>,
    other_policy: Option<String>,
}

/// Every disk of `host` with its directions; all in one state (a
/// reprotect moves the host as a whole).
fn directions_of(tx: &Transaction<'_>, host: &str) -> Result<Vec<Direction>> {
    const OP: &str = "reprotect";
    let mut stmt = tx
        .prepare(
            "SELECT disk, state, policy, other_target, other_policy FROM protections
             WHERE host = ?1 ORDER BY disk",
        )
        .map_err(Error::db(OP))?;
    let rows = stmt
        .query_map([host], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                Direction {
                    state: ProtectionState::Enabling,
                    policy: r.get(2)?,
                    other_target: r.get(3)?,
                    other_policy: r.get(4)?,
                },
            ))
        })
        .map_err(Error::db(OP))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::db(OP))?;
    let mut out = Vec::new();
    for (disk, state, mut d) in rows {
        d.state = ProtectionState::parse(&state).ok_or_else(|| {
            Error::new(
                ErrorKind::Db,
                OP,
                format!("{host}/{disk}: unknown state {state:?}"),
            )
        })?;
        if d.state != ProtectionState::Committed && d.state != ProtectionState::FailedBack {
            return Err(conflict(
                OP,
                format!(
                    "{host}/{disk} is {}: a reprotect follows a committed failover or a failback",
                    d.state.as_str()
                ),
            ));
        }
        out.push(d);
    }
    if out.windows(2).any(|w| w[0].state != w[1].state) {
        return Err(conflict(
            OP,
            format!("{host}'s disks are in different states"),
        ));
    }
    Ok(out)
}

/// Swaps the directions back after a failed reprotect job and moves the
/// lifecycle back (inside the job's transaction).
pub(crate) fn undo_reprotect_in(tx: &Connection, host: &str) -> Result<()> {
    const OP: &str = "undo reprotect";
    transition_host_in(tx, host, Event::ReprotectFailed, true)?;
    tx.execute(
        "UPDATE protections SET target = other_target, policy = other_policy,
             other_target = target, other_policy = policy
         WHERE host = ?1 AND other_target IS NOT NULL AND other_policy IS NOT NULL",
        [host],
    )
    .map_err(Error::db(OP))?;
    Ok(())
}

/// Inserts `p` (linked to its failback policy `failback`); 0 if the name
/// is taken.
fn insert_policy(tx: &Transaction<'_>, p: &Policy, failback: Option<&str>) -> Result<usize> {
    const OP: &str = "create policy";
    tx.execute(
        "INSERT INTO policies (name, rpo_alert_secs, retention_secs, crash_interval_secs,
             app_interval_secs, compression_level, bandwidth, failback)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(name) DO NOTHING",
        params![
            p.name,
            sql_i64(p.rpo_alert_secs, "rpo")?,
            sql_i64(p.retention_secs, "retention")?,
            sql_i64(p.crash_interval_secs, "crash interval")?,
            p.app_interval_secs
                .map(|v| sql_i64(v, "app interval"))
                .transpose()?,
            p.compression_level,
            sql_i64(p.bandwidth, "bandwidth")?,
            failback
        ],
    )
    .map_err(Error::db(OP))
}

fn queue_host_job(tx: &Transaction<'_>, j: &HostJob<'_>) -> Result<Job> {
    const OP: &str = "create job";
    let host = j.host;
    let targets: Vec<String> = column(
        tx,
        OP,
        "SELECT DISTINCT target FROM protections WHERE host = ?1",
        [host],
    )?;
    let target = match targets.as_slice() {
        [t] => t.clone(),
        [] => {
            return Err(not_found(
                OP,
                format!("host {host:?} has no protected disk"),
            ))
        }
        _ => {
            return Err(conflict(
                OP,
                format!("host {host:?} replicates to several targets"),
            ))
        }
    };
    match j.gate {
        JobGate::Free => {}
        JobGate::Start(event) => {
            transition_host_in(tx, host, event, false)?;
        }
        JobGate::Require(event) => {
            // Check only: the step is taken when the job ends.
            check_host_in(tx, host, event)?;
        }
    }
    if j.kind != "points" {
        // One verb per host at a time (as the target allows): a commit
        // queued behind a change of point would race it.
        let busy: Option<(i64, String)> = tx
            .query_row(
                "SELECT id, kind FROM jobs WHERE subject = ?1 AND owner LIKE 'target:%'
                   AND kind != 'points' AND state IN ('queued', 'running') LIMIT 1",
                [host],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(Error::db(OP))?;
        if let Some((id, kind)) = busy {
            return Err(conflict(
                OP,
                format!("host {host} has job {id} ({kind}) not ended yet"),
            ));
        }
    }
    let owner = format!("target:{target}");
    tx.execute(
        "INSERT INTO jobs (kind, subject, owner, state, params, created_at, lease_until)
         VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6)",
        params![
            j.kind,
            host,
            owner,
            json_text(&j.params),
            now(),
            now() + JOB_CLAIM_SECS
        ],
    )
    .map_err(Error::db(OP))?;
    let id = tx.last_insert_rowid();
    add_log(tx, id, &format!("queued for {owner}"))?;
    job_in(tx, id, false)
}

/// See [`Store::heartbeat_disks`].
fn record_disks(tx: &Transaction<'_>, host: &str, disks: &[DiskInfo]) -> Result<()> {
    const OP: &str = "record disks";
    for d in disks {
        if d.name.is_empty() || d.name.len() > 64 {
            return Err(Error::new(
                ErrorKind::Invalid,
                OP,
                format!("bad disk name {:?}", d.name),
            ));
        }
        tx.execute(
            "INSERT INTO disks (host, name, size) VALUES (?1, ?2, ?3)
             ON CONFLICT(host, name) DO UPDATE SET size = excluded.size",
            params![host, d.name, sql_i64(d.size, "disk size")?],
        )
        .map_err(Error::db(OP))?;
    }
    let keep: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    let listed = serde_json::to_string(&keep).unwrap_or_else(|_| "[]".into());
    tx.execute(
        "DELETE FROM disks WHERE host = ?1
           AND name NOT IN (SELECT value FROM json_each(?2))
           AND name NOT IN (SELECT disk FROM protections WHERE host = ?1)",
        params![host, listed],
    )
    .map_err(Error::db(OP))?;
    Ok(())
}

/// Feeds `event` to every protected disk of `host` inside `tx`; returns
/// the protections that changed. Not `lenient`: one refusal fails all.
pub(crate) fn transition_host_in(
    tx: &Connection,
    host: &str,
    event: Event,
    lenient: bool,
) -> Result<Vec<Protection>> {
    let disks: Vec<String> = column(
        tx,
        "change protection state",
        "SELECT disk FROM protections WHERE host = ?1 ORDER BY disk",
        [host],
    )?;
    let mut out = Vec::new();
    for disk in disks {
        if let Some(p) = transition_in(tx, host, &disk, event, lenient)? {
            out.push(p);
        }
    }
    Ok(out)
}

/// The lifecycle record of `host/disk`, if it is protected.
fn record_of(conn: &Connection, host: &str, disk: &str) -> Result<Option<Record>> {
    const OP: &str = "read protection state";
    let row: Option<(String, Option<String>)> = conn
        .query_row(
            "SELECT state, before_failover FROM protections WHERE host = ?1 AND disk = ?2",
            [host, disk],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(Error::db(OP))?;
    let Some((state, before)) = row else {
        return Ok(None);
    };
    Ok(Some(Record {
        state: ProtectionState::parse(&state)
            .ok_or_else(|| Error::new(ErrorKind::Db, OP, format!("unknown state {state:?}")))?,
        before_failover: before.as_deref().and_then(ProtectionState::parse),
    }))
}

/// Whether `event` would be allowed on every protected disk of `host`
/// (nothing is written).
fn check_host_in(conn: &Connection, host: &str, event: Event) -> Result<()> {
    const OP: &str = "check protection state";
    let disks: Vec<String> = column(
        conn,
        OP,
        "SELECT disk FROM protections WHERE host = ?1 ORDER BY disk",
        [host],
    )?;
    for disk in disks {
        if let Some(record) = record_of(conn, host, &disk)? {
            lifecycle::apply(record, event)
                .map_err(|why| conflict(OP, format!("{host}/{disk}: {why}")))?;
        }
    }
    Ok(())
}

/// Applies `event` to `host/disk` inside `tx`; returns the protection if
/// its state changed. With `lenient`, a refused event (a stale report) is
/// ignored instead of failing the transaction.
pub(crate) fn transition_in(
    tx: &Connection,
    host: &str,
    disk: &str,
    event: Event,
    lenient: bool,
) -> Result<Option<Protection>> {
    const OP: &str = "change protection state";
    let Some(record) = record_of(tx, host, disk)? else {
        return Ok(None);
    };
    let (next, transition) = match lifecycle::apply(record, event) {
        Ok(ok) => ok,
        Err(_) if lenient => return Ok(None),
        Err(why) => return Err(conflict(OP, format!("{host}/{disk}: {why}"))),
    };
    if next == record {
        return Ok(None);
    }
    tx.execute(
        "UPDATE protections SET state = ?1, before_failover = ?2, since = ?3, reason = ?4
         WHERE host = ?5 AND disk = ?6",
        params![
            next.state.as_str(),
            next.before_failover.map(ProtectionState::as_str),
            now(),
            transition.reason,
            host,
            disk
        ],
    )
    .map_err(Error::db(OP))?;
    tracing::info!(
        host,
        disk,
        from = record.state.as_str(),
        to = next.state.as_str(),
        reason = transition.reason,
        "protection state"
    );
    let all = protections_of(tx, Some(host))?;
    Ok(all.into_iter().find(|p| p.disk == disk))
}

fn heartbeats_of(conn: &Connection, owner: &str) -> Result<Vec<Heartbeat>> {
    const OP: &str = "read heartbeats";
    let mut stmt = conn
        .prepare("SELECT component, at, status FROM heartbeats WHERE owner = ?1 ORDER BY component")
        .map_err(Error::db(OP))?;
    let rows: Vec<(String, i64, String)> = stmt
        .query_map([owner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(Error::db(OP))?
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::db(OP))?;
    Ok(rows
        .into_iter()
        .filter_map(|(c, at, status)| {
            Some(Heartbeat {
                component: ferry_api::types::Component::parse(&c)?,
                at,
                status: parse_json(&status),
            })
        })
        .collect())
}

fn protections_of(conn: &Connection, host: Option<&str>) -> Result<Vec<Protection>> {
    const OP: &str = "read protections";
    let mut stmt = conn
        .prepare(
            "SELECT host, disk, policy, target, state, since, reason, lag_secs, resync_bytes
             FROM protections WHERE ?1 IS NULL OR host = ?1 ORDER BY host, disk",
        )
        .map_err(Error::db(OP))?;
    let rows = stmt
        .query_map([host], |r| {
            let state: String = r.get(4)?;
            Ok((
                state,
                Protection {
                    host: r.get(0)?,
                    disk: r.get(1)?,
                    policy: r.get(2)?,
                    target: r.get(3)?,
                    // Filled in below: the state is checked outside the row closure.
                    state: ProtectionState::Enabling,
                    since: r.get(5)?,
                    reason: r.get(6)?,
                    lag_secs: from_i64(r.get(7)?),
                    resync_bytes: from_i64(r.get(8)?),
                },
            ))
        })
        .map_err(Error::db(OP))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::db(OP))?;
    rows.into_iter()
        .map(|(state, p)| {
            let state = ProtectionState::parse(&state)
                .ok_or_else(|| Error::new(ErrorKind::Db, OP, format!("unknown state {state:?}")))?;
            Ok(Protection { state, ..p })
        })
        .collect()
}

fn add_log(tx: &Transaction<'_>, id: i64, line: &str) -> Result<()> {
    const OP: &str = "job log";
    tx.execute(
        "INSERT INTO job_log (job, at, line) VALUES (?1, ?2, ?3)",
        params![id, now(), line],
    )
    .map_err(Error::db(OP))?;
    tx.execute(
        "DELETE FROM job_log WHERE job = ?1 AND rowid NOT IN
           (SELECT rowid FROM job_log WHERE job = ?1 ORDER BY rowid DESC LIMIT ?2)",
        params![id, MAX_JOB_LOG_LINES],
    )
    .map_err(Error::db(OP))?;
    Ok(())
}

fn running_job_of(tx: &Transaction<'_>, id: i64, owner: &str, op: &'static str) -> Result<Job> {
    let job = job_in(tx, id, false)?;
    if job.owner != owner {
        return Err(Error::new(
            ErrorKind::Forbidden,
            op,
            format!("job {id} belongs to {}", job.owner),
        ));
    }
    if job.state != JobState::Running {
        return Err(conflict(op, format!("job {id} is {}", job.state.as_str())));
    }
    Ok(job)
}

fn end_job(
    tx: &Transaction<'_>,
    job: &Job,
    result: Option<&serde_json::Value>,
    error: Option<&str>,
) -> Result<()> {
    let (state, progress) = match error {
        None => (JobState::Succeeded, 1.0),
        Some(_) => (JobState::Failed, job.progress),
    };
    tx.execute(
        "UPDATE jobs SET state = ?1, progress = ?2, result = ?3, error = ?4, finished_at = ?5,
             lease_until = NULL WHERE id = ?6",
        params![
            state.as_str(),
            progress,
            result.map(json_text),
            error,
            now(),
            job.id
        ],
    )
    .map_err(Error::db("finish job"))?;
    let line = match error {
        None => "succeeded".to_owned(),
        Some(e) => format!("failed: {e}"),
    };
    add_log(tx, job.id, &line)
}

fn job_in(conn: &Connection, id: i64, with_log: bool) -> Result<Job> {
    const OP: &str = "read job";
    type Row = (
        String,
        String,
        String,
        String,
        f64,
        String,
        Option<String>,
        Option<String>,
        i64,
        Option<i64>,
        Option<i64>,
    );
    let row: Option<Row> = conn
        .query_row(
            "SELECT kind, subject, owner, state, progress, params, result, error, created_at,
                    started_at, finished_at FROM jobs WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                ))
            },
        )
        .optional()
        .map_err(Error::db(OP))?;
    let Some((
        kind,
        subject,
        owner,
        state,
        progress,
        params,
        result,
        error,
        created_at,
        started_at,
        finished_at,
    )) = row
    else {
        return Err(not_found(OP, format!("no job {id}")));
    };
    let log = if with_log {
        let mut stmt = conn
            .prepare("SELECT at, line FROM job_log WHERE job = ?1 ORDER BY rowid")
            .map_err(Error::db(OP))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok(JobLogLine {
                    at: r.get(0)?,
                    line: r.get(1)?,
                })
            })
            .map_err(Error::db(OP))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db(OP))?
    } else {
        Vec::new()
    };
    Ok(Job {
        id,
        kind,
        subject,
        owner,
        state: JobState::parse(&state)
            .ok_or_else(|| Error::new(ErrorKind::Db, OP, format!("unknown job state {state:?}")))?,
        progress,
        params: parse_json(&params),
        result: result.as_deref().map(parse_json),
        error,
        created_at,
        started_at,
        finished_at,
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::types::Component;

    /// A temporary directory, removed when dropped.
    struct Tmp(std::path::PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store() -> (Tmp, Store) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-db-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("server.db")).unwrap();
        (Tmp(dir), store)
    }

    fn register(store: &Store, role: Role, name: &str, token: &[u8], api: &[u8]) -> Result<()> {
        store
            .add_token(token, role, None, true, Some(name), Some(now() + 60))
            .ok();
        let addr = (role == Role::Target).then_some("127.0.0.1:9443");
        store.register(token, role, name, addr, api, || Ok(()))
    }

    fn disk(name: &str) -> DiskInfo {
        DiskInfo {
            name: name.into(),
            size: 1 << 30,
        }
    }

    fn rep(disk: &str, consistent: bool) -> DiskReplication {
        DiskReplication {
            disk: disk.into(),
            shipping: true,
            consistent,
            lag_secs: 1,
            resync_bytes: 0,
        }
    }

    #[test]
    fn schema_migrates_once_and_newer_is_refused() {
        let (tmp, store) = store();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
        drop(store);
        let path = tmp.0.join("server.db");
        let again = Store::open(&path).unwrap();
        assert_eq!(again.schema_version().unwrap(), MIGRATIONS.len());
        again
            .lock()
            .execute_batch(&format!("PRAGMA user_version = {}", MIGRATIONS.len() + 1))
            .unwrap();
        drop(again);
        let e = Store::open(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Db);
        assert!(e.to_string().contains("newer ferry"), "{e}");
    }

    #[test]
    fn a_registration_token_works_once_for_its_role_and_name() {
        let (_tmp, s) = store();
        register(&s, Role::Host, "web01", b"t1", b"api1").unwrap();
        assert_eq!(
            s.principal(b"api1").unwrap(),
            Some(Principal::Host("web01".into()))
        );
        // The one-time token is no API token, and is used up.
        assert_eq!(s.principal(b"t1").unwrap(), None);
        let e = s
            .register(b"t1", Role::Host, "web02", None, b"api2", || Ok(()))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthenticated);
        assert!(s.host("web02").is_err());
        // Wrong role.
        s.add_token(b"t2", Role::Target, None, true, None, None)
            .unwrap();
        let e = s
            .register(b"t2", Role::Host, "web02", None, b"api2", || Ok(()))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthenticated);
        // Bound to another name.
        s.add_token(b"t3", Role::Host, None, true, Some("db01"), None)
            .unwrap();
        let e = s
            .register(b"t3", Role::Host, "web02", None, b"api2", || Ok(()))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Forbidden);
        // Expired.
        s.add_token(b"t4", Role::Host, None, true, None, Some(now() - 1))
            .unwrap();
        assert!(s
            .register(b"t4", Role::Host, "web02", None, b"api2", || Ok(()))
            .is_err());
        // Failing credentials leave nothing behind, token included.
        s.add_token(b"t5", Role::Host, None, true, None, None)
            .unwrap();
        let e = s
            .register(
                b"t5",
                Role::Host,
                "web03",
                None,
                b"api3",
                || -> Result<()> { Err(Error::new(ErrorKind::Io, "issue", "disk full")) },
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(s.host("web03").is_err());
        assert_eq!(s.principal(b"api3").unwrap(), None);
        register(&s, Role::Host, "web03", b"t5", b"api3").unwrap();
    }

    #[test]
    fn one_name_one_role_and_takeovers_need_a_bound_token() {
        let (_tmp, s) = store();
        register(&s, Role::Host, "web01", b"t1", b"h").unwrap();
        s.add_token(b"t2", Role::Target, None, true, None, None)
            .unwrap();
        let e = s
            .register(b"t2", Role::Target, "web01", Some("x:1"), b"t", || Ok(()))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        s.add_token(b"t3", Role::Host, None, true, None, None)
            .unwrap();
        let e = s
            .register(b"t3", Role::Host, "web01", None, b"h2", || Ok(()))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Forbidden);
        assert_eq!(
            s.principal(b"h").unwrap(),
            Some(Principal::Host("web01".into()))
        );
    }

    #[test]
    fn re_registration_revokes_the_old_api_token() {
        let (_tmp, s) = store();
        register(&s, Role::Host, "web01", b"t1", b"old").unwrap();
        register(&s, Role::Host, "web01", b"t2", b"new").unwrap();
        assert_eq!(s.principal(b"old").unwrap(), None);
        assert_eq!(
            s.principal(b"new").unwrap(),
            Some(Principal::Host("web01".into()))
        );
    }

    #[test]
    fn protection_follows_the_sidecar_reports() {
        let (_tmp, s) = store();
        register(&s, Role::Host, "web01", b"t1", b"h").unwrap();
        register(&s, Role::Target, "site-b", b"t2", b"t").unwrap();
        s.create_policy(&Policy::with_defaults("gold")).unwrap();
        assert_eq!(
            s.create_policy(&Policy::with_defaults("gold"))
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        // No disks reported yet: protecting "all" is refused.
        assert_eq!(
            s.protect("web01", &[], "gold", "site-b")
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        s.heartbeat(
            "web01",
            Component::Filter,
            &[disk("data"), disk("logs")],
            &[],
            &serde_json::json!({}),
        )
        .unwrap();
        assert_eq!(
            s.protect("web01", &[], "nope", "site-b")
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        let p = s.protect("web01", &[], "gold", "site-b").unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| p.state == ProtectionState::Enabling));
        let changed = s
            .heartbeat(
                "web01",
                Component::Sidecar,
                &[],
                &[rep("data", false), rep("logs", true)],
                &serde_json::json!({}),
            )
            .unwrap();
        assert_eq!(changed.len(), 2);
        let state = |d: &str| {
            s.protections(Some("web01"))
                .unwrap()
                .into_iter()
                .find(|p| p.disk == d)
                .unwrap()
                .state
        };
        assert_eq!(state("data"), ProtectionState::InitialSync);
        assert_eq!(state("logs"), ProtectionState::Protected);
        // A failover needs every disk able to fail over: all or nothing.
        assert_eq!(
            s.transition_host("web01", Event::FailoverStarted)
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        assert_eq!(state("logs"), ProtectionState::Protected);
        s.heartbeat(
            "web01",
            Component::Sidecar,
            &[],
            &[rep("data", true)],
            &serde_json::json!({}),
        )
        .unwrap();
        s.transition_host("web01", Event::FailoverStarted).unwrap();
        // Reports no longer move it.
        s.heartbeat(
            "web01",
            Component::Sidecar,
            &[],
            &[rep("data", false)],
            &serde_json::json!({}),
        )
        .unwrap();
        assert_eq!(state("data"), ProtectionState::FailoverInProgress);
        s.transition_host("web01", Event::FailoverFailed).unwrap();
        assert_eq!(state("data"), ProtectionState::Protected);
        // A filter that no longer sees a protected disk does not drop it.
        s.heartbeat(
            "web01",
            Component::Filter,
            &[disk("data")],
            &[],
            &serde_json::json!({}),
        )
        .unwrap();
        let names: Vec<_> = s
            .host("web01")
            .unwrap()
            .disks
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["data", "logs"]);
    }

    #[test]
    fn one_job_per_host_and_a_new_target_starts_over() {
        let (_tmp, s) = store();
        register(&s, Role::Host, "web01", b"t1", b"h").unwrap();
        register(&s, Role::Target, "site-b", b"t2", b"t").unwrap();
        register(&s, Role::Target, "site-c", b"t3", b"api3").unwrap();
        s.create_policy(&Policy::with_defaults("gold")).unwrap();
        s.heartbeat(
            "web01",
            Component::Filter,
            &[disk("data")],
            &[],
            &serde_json::json!({}),
        )
        .unwrap();
        s.protect("web01", &[], "gold", "site-b").unwrap();
        s.heartbeat(
            "web01",
            Component::Sidecar,
            &[],
            &[rep("data", true)],
            &serde_json::json!({}),
        )
        .unwrap();
        let state = |s: &Store| s.protections(Some("web01")).unwrap()[0].state;
        assert_eq!(state(&s), ProtectionState::Protected);
        // Same target: the state stays; another target: it starts over.
        s.protect("web01", &[], "gold", "site-b").unwrap();
        assert_eq!(state(&s), ProtectionState::Protected);
        s.protect("web01", &[], "gold", "site-c").unwrap();
        assert_eq!(state(&s), ProtectionState::Enabling);
        s.heartbeat(
            "web01",
            Component::Sidecar,
            &[],
            &[rep("data", true)],
            &serde_json::json!({}),
        )
        .unwrap();
        // A second verb while one is queued is refused; reading points is not.
        let json = serde_json::json!({});
        s.create_host_job("web01", "test-failover", &json, JobGate::Free)
            .unwrap();
        let e = s
            .create_host_job("web01", "commit", &json, JobGate::Free)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        s.create_host_job("web01", "points", &json, JobGate::Free)
            .unwrap();
    }

    #[test]
    fn a_policy_comes_with_its_failback_policy_and_both_can_be_changed() {
        let (_tmp, s) = store();
        let mut gold = Policy::with_defaults("gold");
        gold.compression_level = 3;
        gold.bandwidth = 10 << 20;
        s.create_policy(&gold).unwrap();
        let p = s.policy("gold").unwrap();
        assert_eq!(p.failback.as_deref(), Some("gold-failback"));
        let back = s.policy("gold-failback").unwrap();
        // The seed's failback defaults, over the forward policy's link.
        assert_eq!(
            (
                back.rpo_alert_secs,
                back.retention_secs,
                back.app_interval_secs
            ),
            (15 * 60, 24 * 3600, Some(3600))
        );
        assert_eq!((back.compression_level, back.bandwidth), (3, 10 << 20));
        assert_eq!(back.failback, None);
        // A taken companion name refuses the pair, and nothing is created.
        s.create_policy(&Policy::with_defaults("silver-failback"))
            .unwrap();
        let e = s
            .create_policy(&Policy::with_defaults("silver"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(s.policy("silver").is_err());
        // Editable; the link stays.
        let mut changed = back.clone();
        changed.rpo_alert_secs = 1800;
        changed.app_interval_secs = None;
        let after = s.update_policy(&changed).unwrap();
        assert_eq!(
            (after.rpo_alert_secs, after.app_interval_secs),
            (1800, None)
        );
        assert_eq!(
            s.policy("gold").unwrap().failback.as_deref(),
            Some("gold-failback")
        );
        let mut bad = after;
        bad.retention_secs = 0;
        assert_eq!(
            s.update_policy(&bad).unwrap_err().kind(),
            ErrorKind::Invalid
        );
        bad.name = "nope".into();
        bad.retention_secs = 1;
        assert_eq!(
            s.update_policy(&bad).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn reprotect_swaps_directions_and_a_failed_one_swaps_them_back() {
        let (_tmp, s) = store();
        register(&s, Role::Host, "web01", b"t1", b"h").unwrap();
        register(&s, Role::Target, "site-b", b"t2", b"t").unwrap();
        register(&s, Role::Target, "site-a", b"t3", b"api3").unwrap();
        s.create_policy(&Policy::with_defaults("gold")).unwrap();
        s.heartbeat(
            "web01",
            Component::Filter,
            &[disk("data")],
            &[],
            &serde_json::json!({}),
        )
        .unwrap();
        s.protect("web01", &[], "gold", "site-b").unwrap();
        s.heartbeat(
            "web01",
            Component::Sidecar,
            &[],
            &[rep("data", true)],
            &serde_json::json!({}),
        )
        .unwrap();
        let p = |s: &Store| s.protections(Some("web01")).unwrap()[0].clone();
        let params = serde_json::json!({"op": "reprotect", "host": "web01"});
        // Only after a committed failover (or a failback).
        let e = s
            .reprotect_host("web01", Some("site-a"), &params)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        s.transition_host("web01", Event::FailoverStarted).unwrap();
        s.transition_host("web01", Event::FailoverSucceeded)
            .unwrap();
        s.transition_host("web01", Event::Committed).unwrap();
        // Back to the primary site needs its target named.
        assert_eq!(
            s.reprotect_host("web01", None, &params).unwrap_err().kind(),
            ErrorKind::Invalid
        );
        assert_eq!(
            s.reprotect_host("web01", Some("nowhere"), &params)
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        let job = s.reprotect_host("web01", Some("site-a"), &params).unwrap();
        assert_eq!(job.owner, "target:site-a");
        let now = p(&s);
        assert_eq!(
            (now.state, now.target.as_str(), now.policy.as_str()),
            (ProtectionState::Reprotecting, "site-a", "gold-failback")
        );
        // The job fails at the target: back where it was.
        s.claim_job("target:site-a").unwrap().unwrap();
        s.finish_job(
            job.id,
            "target:site-a",
            None,
            Some("no such image"),
            |tx, j| undo_reprotect_in(tx, &j.subject),
        )
        .unwrap();
        let now = p(&s);
        assert_eq!(
            (now.state, now.target.as_str(), now.policy.as_str()),
            (ProtectionState::Committed, "site-b", "gold")
        );
        // Again, then failback and forward again: the recorded direction.
        let job = s.reprotect_host("web01", None, &params).unwrap();
        assert_eq!(
            job.owner, "target:site-a",
            "the other direction is remembered"
        );
        s.claim_job("target:site-a").unwrap().unwrap();
        s.finish_job(
            job.id,
            "target:site-a",
            Some(&serde_json::json!({})),
            None,
            |_, _| Ok(()),
        )
        .unwrap();
        s.transition_host("web01", Event::FailbackStarted).unwrap();
        s.transition_host("web01", Event::FailbackSucceeded)
            .unwrap();
        let job = s.reprotect_host("web01", None, &params).unwrap();
        assert_eq!(job.owner, "target:site-b");
        let now = p(&s);
        assert_eq!(
            (now.state, now.target.as_str(), now.policy.as_str()),
            (ProtectionState::Enabling, "site-b", "gold")
        );
    }

    #[test]
    fn cancelled_runs_stay_ended_and_taken_jobs_cannot_be_cancelled() {
        let (_tmp, s) = store();
        let run = s
            .create_job("plan-test", "dr", "server", &serde_json::json!({}))
            .unwrap();
        s.advance_server_job(run, &serde_json::json!({"step": 0}), 0.0, &[], &[])
            .unwrap();
        let j = s.cancel_job(run, |_, _| Ok(())).unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.as_deref(), Some("cancelled by the operator"));
        // The runner's next move changes nothing.
        assert!(s
            .advance_server_job(run, &serde_json::json!({"step": 1}), 0.5, &[], &[])
            .is_err());
        let j = s
            .finish_server_job(run, Some(&serde_json::json!({})), None)
            .unwrap();
        assert_eq!(j.state, JobState::Failed);
        // A target job: cancellable while queued, not once taken.
        let a = s
            .create_job("failover", "web01", "target:site-b", &serde_json::json!({}))
            .unwrap();
        let b = s
            .create_job("commit", "web02", "target:site-b", &serde_json::json!({}))
            .unwrap();
        s.claim_job("target:site-b").unwrap().unwrap();
        assert_eq!(
            s.cancel_job(a, |_, _| Ok(())).unwrap_err().kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            s.cancel_job(b, |_, _| Ok(())).unwrap().state,
            JobState::Failed
        );
    }

    #[test]
    fn jobs_are_claimed_reported_finished_or_expired() {
        let (_tmp, s) = store();
        let a = s
            .create_job(
                "failover",
                "web01",
                "target:site-b",
                &serde_json::json!({"point": "latest"}),
            )
            .unwrap();
        let b = s
            .create_job("commit", "web01", "target:site-b", &serde_json::json!({}))
            .unwrap();
        assert!(s.claim_job("target:other").unwrap().is_none());
        let j = s.claim_job("target:site-b").unwrap().unwrap();
        assert_eq!((j.id, j.state), (a, JobState::Running));
        // Only the owner reports.
        assert_eq!(
            s.job_progress(a, "target:other", Some(0.5), &[])
                .unwrap_err()
                .kind(),
            ErrorKind::Forbidden
        );
        let j = s
            .job_progress(a, "target:site-b", Some(0.5), &["copying".into()])
            .unwrap();
        assert_eq!(j.progress, 0.5);
        let j = s
            .finish_job(
                a,
                "target:site-b",
                Some(&serde_json::json!({"seq": 7})),
                None,
                |_, _| Ok(()),
            )
            .unwrap();
        assert_eq!((j.state, j.progress), (JobState::Succeeded, 1.0));
        assert_eq!(
            s.finish_job(a, "target:site-b", None, None, |_, _| Ok(()))
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        let log: Vec<_> = s
            .job(a, true)
            .unwrap()
            .log
            .into_iter()
            .map(|l| l.line)
            .collect();
        assert_eq!(log, ["taken by target:site-b", "copying", "succeeded"]);
        // A running job whose owner goes silent fails when its lease ends.
        s.claim_job("target:site-b").unwrap().unwrap();
        assert!(s.expire_jobs(|_, _| Ok(())).unwrap().is_empty());
        s.lock()
            .execute(
                "UPDATE jobs SET lease_until = ?1 WHERE id = ?2",
                params![now() - 1, b],
            )
            .unwrap();
        let expired = s.expire_jobs(|_, _| Ok(())).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].state, JobState::Failed);
        assert!(expired[0].error.as_deref().unwrap().contains("lease"));
        let ids: Vec<_> = s.jobs(10).unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(ids, [b, a]);
    }
}
