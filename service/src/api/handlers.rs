//! The endpoints. Each reads the state (SQLite), the configuration, the
//! repository or the runs in progress, and answers JSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use vsnap_coordinator::inventory::AgentSpec;
use vsnap_engine::pipeline::Progress;

use super::{session, Api, ApiError, Q};
use crate::runner::Started;
use crate::state::Trigger;

type Answer = Result<Json<Value>, ApiError>;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "ok": true }))
}

pub async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        super::DASHBOARD,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginQuery {
    code: String,
}

/// A one-time code for a session cookie, then on to the dashboard. The
/// link stays in the browser's history, spent.
pub async fn login(
    State(api): State<Arc<Api>>,
    Q(q): Q<LoginQuery>,
) -> Result<axum::response::Response, ApiError> {
    let id = api
        .sessions
        .redeem(&q.code, session::now())
        .map_err(|r| ApiError(StatusCode::UNAUTHORIZED, r.to_string()))?;
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_owned()),
            (header::SET_COOKIE, session::set_cookie(&id)),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
    )
        .into_response())
}

/// Ends the dashboard's session, in the service and in the browser.
pub async fn logout(
    State(api): State<Arc<Api>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    if let Some(id) = session::cookie(cookies) {
        api.sessions.end(id);
    }
    (
        [(header::SET_COOKIE, session::set_cookie(""))],
        Json(json!({ "signed_out": true })),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    limit: Option<u32>,
}

/// One VM's results, newest first (`?limit=N`, 100; at most 1000): what
/// the dashboard's chart draws.
pub async fn vm_history(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    Q(q): Q<HistoryQuery>,
) -> Answer {
    if !api.svc.config.vms.iter().any(|v| v.name == name) {
        return Err(ApiError::not_found(format!("no VM {name:?}")));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = db(&api, move |s| s.vm_history(&name, limit)).await?;
    Ok(Json(json!(rows)))
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], super::OPENAPI)
}

fn agent_kind(a: &AgentSpec) -> &'static str {
    match a {
        AgentSpec::Vsnap { .. } => "vsnap",
        AgentSpec::Qga(_) => "qemu-ga",
        AgentSpec::None => "none",
    }
}

/// Each VM: its agent, its policy, its last result, and the jobs that
/// cover it with their next runs.
pub async fn vms(State(api): State<Arc<Api>>) -> Answer {
    let now = Utc::now();
    let latest = db(&api, |s| s.latest_per_vm()).await?;
    let mut out = Vec::new();
    for vm in &api.svc.config.vms {
        let jobs: Vec<Value> = api
            .svc
            .config
            .jobs
            .iter()
            .filter(|j| j.vms.contains(&vm.name))
            .map(|j| json!({"job": j.name, "next_run": j.schedule.next_after(now, api.zone)}))
            .collect();
        out.push(json!({
            "name": vm.name,
            "disks": vm.disks,
            "agent": agent_kind(&vm.agent),
            "policy": vm.policy.name(),
            "last": latest.get(&vm.name),
            "jobs": jobs,
        }));
    }
    Ok(Json(Value::Array(out)))
}

/// Runs `f` on the state off the async workers: SQLite blocks.
async fn db<T, F>(api: &Arc<Api>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&crate::state::State) -> crate::Result<T> + Send + 'static,
{
    let api = Arc::clone(api);
    tokio::task::spawn_blocking(move || f(&api.svc.state))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::internal(&e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotQuery {
    vm: Option<String>,
}

/// The repository's snapshots, newest first; `?vm=NAME` for one VM's.
pub async fn snapshots(State(api): State<Arc<Api>>, Q(q): Q<SnapshotQuery>) -> Answer {
    if let Some(vm) = &q.vm {
        if !api.svc.config.vms.iter().any(|v| &v.name == vm) {
            return Err(ApiError::not_found(format!("no VM {vm:?}")));
        }
    }
    let svc = Arc::clone(&api.svc);
    let listed = tokio::task::spawn_blocking(move || svc.repo.listing())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut out: Vec<Value> = listed
        .iter()
        .filter_map(|l| match &l.manifest {
            Ok(m) if q.vm.as_ref().is_none_or(|v| *v == m.vm) => {
                let guest = m.guest();
                Some(json!({
                    "id": m.id,
                    "vm": m.vm,
                    "time": m.time,
                    "consistency": m.consistency,
                    "disks": m.disks.len(),
                    "virtual_bytes": m.totals().virtual_bytes,
                    "freeze_window_us": guest.and_then(|g| g.freeze_window_us),
                    "stall_us": guest.and_then(|g| g.stall_us),
                }))
            }
            Ok(_) => None,
            Err(e) => {
                q.vm.is_none()
                    .then(|| json!({"id": l.id, "error": e.to_string()}))
            }
        })
        .collect();
    out.sort_by(|a, b| b["time"].as_str().cmp(&a["time"].as_str()));
    Ok(Json(Value::Array(out)))
}

/// Each job: its schedule, VMs, next run, the run going now, the last.
pub async fn jobs(State(api): State<Arc<Api>>) -> Answer {
    let now = Utc::now();
    let active = api.svc.active();
    let latest = db(&api, |s| s.latest_per_job()).await?;
    let mut out = Vec::new();
    for j in &api.svc.config.jobs {
        out.push(json!({
            "name": j.name,
            "kind": "backup",
            "schedule": j.schedule_text,
            "vms": j.vms,
            "provider": format!("{:?}", j.provider),
            "window_ms": j.window.as_millis(),
            "persistent": j.persistent,
            "retention": j.keep.is_some(),
            "gc": j.gc,
            "next_run": j.schedule.next_after(now, api.zone),
            "running": active.iter().find(|a| a.job == j.name).map(|a| a.run),
            "last": latest.get(&j.name),
        }));
    }
    for v in &api.svc.config.verifies {
        out.push(json!({
            "name": v.name,
            "kind": "verify",
            "schedule": v.schedule_text,
            "vms": v.vms,
            "outdated_after_s": v.outdated_after.map(|d| d.as_secs()),
            "next_run": v.schedule.next_after(now, api.zone),
            "running": active.iter().find(|a| a.job == v.name).map(|a| a.run),
            "last": latest.get(&v.name),
        }));
    }
    Ok(Json(Value::Array(out)))
}

/// Runs the job now: 202 with the run's id, or 409 when its previous run
/// is still going (recorded as a skip).
pub async fn run_job(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if api.svc.schedule(&name).is_none() {
        return Err(ApiError::not_found(format!("no job {name:?}")));
    }
    started(&name, api.svc.start(&name, Trigger::Manual, None))
}

/// 202 with the run's id, or 409 when the job's previous run goes on.
fn started(name: &str, r: crate::Result<Started>) -> Result<(StatusCode, Json<Value>), ApiError> {
    match r {
        Ok(Started::Run(id)) => Ok((StatusCode::ACCEPTED, Json(json!({ "run": id })))),
        Ok(Started::Skipped(id)) => Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "job {name:?} is running already; this request is recorded as skipped run {id}"
            ),
        )),
        Err(e) => Err(ApiError::internal(&e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    job: Option<String>,
    limit: Option<u32>,
}

/// Runs, newest first: `?job=NAME`, `?limit=N` (50; at most 1000).
pub async fn runs(State(api): State<Arc<Api>>, Q(q): Q<RunsQuery>) -> Answer {
    if let Some(j) = &q.job {
        if api.svc.schedule(j).is_none() && j != "verify" {
            return Err(ApiError::not_found(format!("no job {j:?}")));
        }
    }
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let runs = db(&api, move |s| s.runs(q.job.as_deref(), limit)).await?;
    Ok(Json(json!(runs)))
}

fn run_id(s: &str) -> Result<i64, ApiError> {
    s.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{s:?} is not a run id (a number)"),
        )
    })
}

/// One run, with each VM's result.
pub async fn run(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Answer {
    let id = run_id(&id)?;
    match db(&api, move |s| s.run(id)).await? {
        Some((run, vms)) => Ok(Json(json!({ "run": run, "vms": vms }))),
        None => Err(ApiError::not_found(format!("no run {id}"))),
    }
}

/// Live progress of a run, as server-sent events: `progress` every half
/// second while it runs, then `end` with its final state.
pub async fn events(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = run_id(&id)?;
    if api
        .svc
        .state
        .run(id)
        .map_err(|e| ApiError::internal(&e))?
        .is_none()
    {
        return Err(ApiError::not_found(format!("no run {id}")));
    }
    let stream = futures_util::stream::unfold(Some(api), move |api| async move {
        let api = api?;
        let live = api.svc.active().into_iter().find(|a| a.run == id);
        if let Some(a) = live {
            let ev = json!({
                "run": id,
                "state": "running",
                "done_bytes": Progress::get(&a.progress.done),
                "total_bytes": Progress::get(&a.progress.total),
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Some((
                Ok(Event::default().event("progress").data(ev.to_string())),
                Some(api),
            ));
        }
        let ended = api.svc.state.run(id).ok().flatten().map(|(r, _)| r);
        let ev = json!({ "run": ended });
        Some((Ok(Event::default().event("end").data(ev.to_string())), None))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Cancels a run by the session's rules: every guest it froze is thawed.
pub async fn cancel(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = run_id(&id)?;
    if api.svc.cancel(id) {
        return Ok((StatusCode::ACCEPTED, Json(json!({ "cancelling": id }))));
    }
    match api.svc.state.run(id).map_err(|e| ApiError::internal(&e))? {
        Some((run, _)) => Err(ApiError(
            StatusCode::CONFLICT,
            format!("run {id} has ended ({}): too late to cancel", run.state),
        )),
        None => Err(ApiError::not_found(format!("no run {id}"))),
    }
}

/// Prometheus' text format; see [`crate::metrics`].
pub async fn metrics(State(api): State<Arc<Api>>) -> Result<impl IntoResponse, ApiError> {
    let vms = api
        .svc
        .state
        .vm_stats()
        .map_err(|e| ApiError::internal(&e))?;
    let usage = {
        let mut cached = api.usage.lock().await;
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < super::USAGE_TTL);
        if !fresh {
            let svc = Arc::clone(&api.svc);
            let measured =
                // A session: a bucket's chunk count comes from the pack
                // indexes a handle reads once, which a shared one would
                // keep from the first measure on.
                tokio::task::spawn_blocking(move || svc.repo.session().and_then(|r| r.usage()))
                    .await
                    .ok()
                    .and_then(Result::ok);
            if let Some(u) = measured {
                *cached = Some((std::time::Instant::now(), u));
            }
        }
        cached.as_ref().map(|c| c.1)
    };
    let text = crate::metrics::render(&vms, usage.as_ref(), api.svc.active().len());
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyBody {
    /// Snapshot ids; all of the repository's when empty or left out.
    #[serde(default)]
    snapshots: Vec<String>,
}

/// Starts a verify of the snapshots named (all, when none): 202 with the
/// run's id; 404 for a snapshot that does not exist shows in the run.
pub async fn verify(
    State(api): State<Arc<Api>>,
    super::Body(body): super::Body<VerifyBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if let Some(bad) = body
        .snapshots
        .iter()
        .find(|s| vsnap_repo::validate::snapshot_id_rule(s).is_some())
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body: {bad:?} is not a snapshot id"),
        ));
    }
    started("verify", api.svc.verify_now(body.snapshots))
}
