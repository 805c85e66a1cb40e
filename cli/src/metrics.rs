//! `--metrics-listen ADDR` of every daemon: Prometheus pages built from
//! what each daemon already publishes (the filter's control-socket status,
//! the sidecar's `metrics.json`, the target's `status.json` files), served
//! as plain HTTP by `ferry_api::metrics`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use ferry_api::metrics::{Kind, Page};

/// Serves `render` on `addr` (if given) until `stop`.
pub fn serve(
    addr: Option<&str>,
    stop: &Arc<AtomicBool>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let bound = ferry_api::metrics::spawn(addr, stop.clone(), render)
        .with_context(|| format!("metrics on {addr}"))?;
    tracing::info!(addr = %bound, "metrics at http://{bound}/metrics");
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn f(v: u64) -> f64 {
    v as f64
}

/// The filter's page: per disk tracking state, ring fill, lag, dirty bytes.
pub fn filter_page(state: &Path) -> String {
    let mut page = Page::new();
    let status = ferry_sidecar::filterctl::FilterControl::new(state).status();
    page.sample(
        "ferry_filter_up",
        "1 when the filter answers on its control socket.",
        Kind::Gauge,
        &[],
        if status.is_ok() { 1.0 } else { 0.0 },
    );
    if let Ok(s) = status {
        page.sample(
            "ferry_filter_seq",
            "Highest sequence number assigned.",
            Kind::Gauge,
            &[],
            f(s.seq),
        );
        for d in &s.disks {
            let disk = [("disk", d.name.as_str())];
            page.sample(
                "ferry_filter_disk_size_bytes",
                "Size of each protected disk.",
                Kind::Gauge,
                &disk,
                f(d.size),
            );
            page.sample(
                "ferry_filter_tracking_state",
                "1 for each disk's tracking state (data, metadata, bitmap).",
                Kind::Gauge,
                &[("disk", d.name.as_str()), ("state", d.tracking.as_str())],
                1.0,
            );
            page.sample(
                "ferry_filter_dirty_bytes",
                "Bytes marked dirty (awaiting a resync or its commit).",
                Kind::Gauge,
                &disk,
                f(d.dirty_bytes),
            );
            page.sample(
                "ferry_filter_lag_seconds",
                "Age of the oldest record the sidecar has not committed.",
                Kind::Gauge,
                &disk,
                d.lag_seconds,
            );
        }
    }
    page.render()
}

/// The sidecar's page, from its `metrics.json`.
pub fn sidecar_page(state: &Path) -> String {
    let mut page = Page::new();
    let m = std::fs::read_to_string(crate::replicate::metrics_path(state))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    page.sample(
        "ferry_sidecar_metrics_present",
        "1 when the sidecar's metrics file is readable.",
        Kind::Gauge,
        &[],
        if m.is_some() { 1.0 } else { 0.0 },
    );
    let Some(m) = m else { return page.render() };
    page.sample(
        "ferry_sidecar_spool_size_bytes",
        "Capacity of the spool.",
        Kind::Gauge,
        &[],
        m["spool_size"].as_f64().unwrap_or(0.0),
    );
    for d in m["disks"].as_array().into_iter().flatten() {
        let disk = [("disk", d["disk"].as_str().unwrap_or("?"))];
        let num = |k: &str| d[k].as_f64().unwrap_or(0.0);
        page.sample(
            "ferry_sidecar_connected",
            "1 while the disk's connection to the target is up.",
            Kind::Gauge,
            &disk,
            if d["connected"] == true { 1.0 } else { 0.0 },
        );
        page.sample(
            "ferry_sidecar_consistent",
            "1 while the replica is consistent.",
            Kind::Gauge,
            &disk,
            if d["consistent_since"].is_null() {
                0.0
            } else {
                1.0
            },
        );
        page.sample(
            "ferry_sidecar_acked_seq",
            "Highest sequence number the target acknowledged.",
            Kind::Gauge,
            &disk,
            num("acked_seq"),
        );
        page.sample(
            "ferry_sidecar_lag_seconds",
            "Age of the oldest write not yet acknowledged (the RPO now).",
            Kind::Gauge,
            &disk,
            num("lag_seconds"),
        );
        page.sample(
            "ferry_sidecar_lag_bytes",
            "Bytes recorded and not yet acknowledged.",
            Kind::Gauge,
            &disk,
            num("lag_bytes"),
        );
        page.sample(
            "ferry_sidecar_raw_bytes_total",
            "Bytes of changes shipped, before compression.",
            Kind::Counter,
            &disk,
            num("raw_bytes"),
        );
        page.sample(
            "ferry_sidecar_shipped_bytes_total",
            "Bytes sent on the wire.",
            Kind::Counter,
            &disk,
            num("shipped_bytes"),
        );
        page.sample(
            "ferry_sidecar_change_sets_total",
            "Change sets acknowledged.",
            Kind::Counter,
            &disk,
            num("change_sets"),
        );
        page.sample(
            "ferry_sidecar_spool_bytes",
            "Bytes waiting in the spool.",
            Kind::Gauge,
            &disk,
            num("spool_bytes"),
        );
    }
    page.render()
}

/// The target's page, from its status files.
pub fn target_page(data: &Path) -> String {
    let mut page = Page::new();
    let statuses = ferry_master_target::site::read_statuses(data);
    page.sample(
        "ferry_target_status_readable",
        "1 when the target's status files are readable.",
        Kind::Gauge,
        &[],
        if statuses.is_ok() { 1.0 } else { 0.0 },
    );
    if let Some((free, total)) = crate::agent::fs_space(data) {
        page.sample(
            "ferry_target_fs_free_bytes",
            "Free bytes on the data file system.",
            Kind::Gauge,
            &[],
            f(free),
        );
        page.sample(
            "ferry_target_fs_size_bytes",
            "Size of the data file system.",
            Kind::Gauge,
            &[],
            f(total),
        );
    }
    let now = ferry_ring::ring::now_ns();
    for d in statuses.unwrap_or_default() {
        let l = [("host", d.host.as_str()), ("disk", d.disk.as_str())];
        page.sample(
            "ferry_target_applied_seq",
            "Highest sequence applied to the replica.",
            Kind::Gauge,
            &l,
            f(d.applied_seq.unwrap_or(0)),
        );
        page.sample(
            "ferry_target_received_seq",
            "Highest sequence received (durable in the journal).",
            Kind::Gauge,
            &l,
            f(d.received_seq.unwrap_or(0)),
        );
        page.sample(
            "ferry_target_apply_backlog_bytes",
            "Bytes received and not yet applied.",
            Kind::Gauge,
            &l,
            f(d.apply_backlog_bytes),
        );
        page.sample(
            "ferry_target_journal_bytes",
            "Bytes of journal segments.",
            Kind::Gauge,
            &l,
            f(d.journal_bytes),
        );
        page.sample(
            "ferry_target_history_bytes",
            "Bytes of history (undo) segments.",
            Kind::Gauge,
            &l,
            f(d.undo_bytes),
        );
        page.sample(
            "ferry_target_points",
            "Recovery points held.",
            Kind::Gauge,
            &l,
            f(d.points.count),
        );
        let consistent = matches!(
            d.consistency,
            ferry_master_target::site::Consistency::Consistent { .. }
        );
        page.sample(
            "ferry_target_consistent",
            "1 while the replica is consistent.",
            Kind::Gauge,
            &l,
            if consistent { 1.0 } else { 0.0 },
        );
        page.sample(
            "ferry_target_connected",
            "1 while the host's sidecar is connected.",
            Kind::Gauge,
            &l,
            if d.connected { 1.0 } else { 0.0 },
        );
        for (name, last) in [
            (
                "ferry_target_crash_point_age_seconds",
                d.points.last_crash_ns,
            ),
            ("ferry_target_app_point_age_seconds", d.points.last_app_ns),
        ] {
            if let Some(ns) = last {
                page.sample(
                    name,
                    "Age of the newest point of its kind.",
                    Kind::Gauge,
                    &l,
                    f(now.saturating_sub(ns)) / 1e9,
                );
            }
        }
    }
    page.render()
}

/// A render closure over a directory.
pub fn over(dir: PathBuf, page: fn(&Path) -> String) -> Arc<dyn Fn() -> String + Send + Sync> {
    Arc::new(move || page(&dir))
}
