//! The HTTP API (axum), on 127.0.0.1 unless the configuration says
//! otherwise, and the dashboard at `/`. Every endpoint but `/healthz`,
//! the dashboard's page (static, no data) and its sign-in (`/login`, see
//! [`session`]) needs `Authorization: Bearer TOKEN`, the token read from
//! `state_dir/api.token`, which the first start creates with mode 0600,
//! or the dashboard's session cookie with its header. Errors are JSON
//! (`{"error": "..."}`): 401 without the token, 403 for the cookie
//! without its header, 400 for a malformed query or body (saying what is
//! wrong), 404 for an unknown job or run, 409 for a request the run's
//! state refuses. A handler that panics answers 500 and the server serves
//! on; a job that panics fails its run (see [`crate::runner`]).

mod handlers;
pub mod listen;
pub mod session;
pub mod token;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State as AxState};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::calendar::Zone;
use crate::runner::Service;

/// The dashboard: one page, its styles and script inline, nothing from
/// elsewhere. It holds no data; every call it makes needs its session.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// The OpenAPI description of this API, served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the handlers share.
pub struct Api {
    pub svc: Arc<Service>,
    pub token: String,
    /// The dashboard's sign-in codes and sessions.
    pub sessions: session::Sessions,
    /// The clock schedules read.
    pub zone: Zone,
    /// The repository's usage, and when it was measured: a walk of the
    /// chunk store, done at most every [`USAGE_TTL`].
    pub usage: tokio::sync::Mutex<Option<(std::time::Instant, vsnap_repo::Usage)>>,
}

/// How long a measure of the repository's usage serves `/metrics`.
pub const USAGE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl Api {
    pub fn new(svc: Arc<Service>, token: String, zone: Zone) -> Arc<Api> {
        Arc::new(Api {
            svc,
            sessions: session::Sessions::new(&token),
            token,
            zone,
            usage: tokio::sync::Mutex::new(None),
        })
    }
}

/// An error answer: a status and a sentence.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl ApiError {
    fn not_found(what: impl Into<String>) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, what.into())
    }

    fn internal(e: &crate::Error) -> ApiError {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, crate::error::chain(e))
    }
}

/// `Query`, with a malformed query answered as a JSON 400 that says what
/// is wrong.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Q(q.0))
            .map_err(|e| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("the query: {}", e.body_text()),
                )
            })
    }
}

/// `Json`, with a malformed body answered as a JSON 400.
pub struct Body<T>(pub T);

/// The largest request body: axum's default limit, which `Json` enforces
/// as the body streams in; a body that declares more is refused first.
const BODY_LIMIT: u64 = 2 << 20;

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Refused from its declared length, before a byte of it is read.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared.filter(|&l| l > BODY_LIMIT) {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body: {len} bytes, over the limit of {BODY_LIMIT}"),
            ));
        }
        Json::<T>::from_request(req, state)
            .await
            .map(|j| Body(j.0))
            // 413 for a body past the limit; 400 for every other fault
            // of the body, as the API documents.
            .map_err(|e| {
                let status = match e.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                ApiError(status, format!("the body: {}", e.body_text()))
            })
    }
}

async fn authorize(AxState(api): AxState<Arc<Api>>, req: Request, next: Next) -> Response {
    let h = req.headers();
    // RFC 7235: the scheme is case-insensitive.
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let cookie = session::cookie(
        h.get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let refusal = match (bearer, cookie) {
        (Some(t), _) if token::matches(&api.token, t) => None,
        (Some(_), _) => Some((StatusCode::UNAUTHORIZED, "the bearer token is not this service's: use the one in its state_dir/api.token (it changes when the file is removed)")),
        (None, Some(id)) if !api.sessions.check(id, session::now()) => Some((StatusCode::UNAUTHORIZED, "the dashboard's session has ended (it lasts 12 hours, and a restart of the service ends it); `vsnap dashboard --config FILE` prints a new sign-in link")),
        (None, Some(_)) if !h.contains_key(session::HEADER) => Some((StatusCode::FORBIDDEN, "a request with the dashboard's session cookie must carry the X-Vsnap-Dashboard header (the dashboard sets it; a form on another site cannot)")),
        (None, Some(_)) => None,
        (None, None) => Some((StatusCode::UNAUTHORIZED, "a bearer token is needed: Authorization: Bearer TOKEN, the token in the service's state_dir/api.token (in a browser, `vsnap dashboard --config FILE` prints a sign-in link)")),
    };
    let Some((status, why)) = refusal else {
        return next.run(req).await;
    };
    let mut r = ApiError(status, why.into()).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Anyone: the health check, the dashboard's page (its API calls
    /// carry its session) and its sign-in (which checks the code).
    Open,
    /// With the bearer token, or the dashboard's session.
    Token,
}

/// Every route: its path, method, access and handler. The router is built
/// from this table, and a test holds it to `openapi.json`, both ways.
fn routes() -> Vec<(&'static str, &'static str, Access, MethodRouter<Arc<Api>>)> {
    use Access::{Open, Token};
    vec![
        ("/healthz", "get", Open, get(handlers::healthz)),
        ("/", "get", Open, get(handlers::dashboard)),
        ("/login", "get", Open, get(handlers::login)),
        ("/logout", "post", Token, post(handlers::logout)),
        ("/api/v1/openapi.json", "get", Token, get(handlers::openapi)),
        ("/api/v1/vms", "get", Token, get(handlers::vms)),
        (
            "/api/v1/vms/{name}/history",
            "get",
            Token,
            get(handlers::vm_history),
        ),
        ("/api/v1/snapshots", "get", Token, get(handlers::snapshots)),
        ("/api/v1/jobs", "get", Token, get(handlers::jobs)),
        (
            "/api/v1/jobs/{name}/run",
            "post",
            Token,
            post(handlers::run_job),
        ),
        ("/api/v1/runs", "get", Token, get(handlers::runs)),
        ("/api/v1/runs/{id}", "get", Token, get(handlers::run)),
        (
            "/api/v1/runs/{id}/events",
            "get",
            Token,
            get(handlers::events),
        ),
        (
            "/api/v1/runs/{id}/cancel",
            "post",
            Token,
            post(handlers::cancel),
        ),
        ("/api/v1/verify", "post", Token, post(handlers::verify)),
        ("/metrics", "get", Token, get(handlers::metrics)),
    ]
}

/// Every route.
pub fn router(api: Arc<Api>) -> Router {
    let (mut open, mut guarded) = (Router::new(), Router::new());
    for (path, _, access, handler) in routes() {
        match access {
            Access::Open => open = open.route(path, handler),
            Access::Token => guarded = guarded.route(path, handler),
        }
    }
    let guarded = guarded.route_layer(axum::middleware::from_fn_with_state(
        Arc::clone(&api),
        authorize,
    ));
    open.merge(guarded)
        .fallback(|| async { ApiError::not_found("no such endpoint; see /api/v1/openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method; see /api/v1/openapi.json".into(),
            )
        })
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the request failed unexpectedly; the service goes on".into(),
                )
                .into_response()
            },
        ))
        .with_state(api)
}

/// Serves `router` on `listener` until `stop` says so.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    listen::serve(listener, router(api), stop).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_openapi_document_and_the_router_name_the_same_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented: Vec<(String, String)> = paths
            .iter()
            .flat_map(|(p, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|m| ["get", "post", "put", "delete", "patch"].contains(&m.as_str()))
                    .map(move |m| (p.clone(), m.clone()))
            })
            .collect();
        let mut routed: Vec<(String, String)> = routes()
            .into_iter()
            .map(|(p, m, ..)| (p.to_owned(), m.to_owned()))
            .collect();
        documented.sort();
        routed.sort();
        let missing: Vec<_> = routed.iter().filter(|r| !documented.contains(r)).collect();
        let unrouted: Vec<_> = documented.iter().filter(|d| !routed.contains(d)).collect();
        assert!(
            missing.is_empty(),
            "routed but not in openapi.json: {missing:?}"
        );
        assert!(
            unrouted.is_empty(),
            "in openapi.json but not routed: {unrouted:?}"
        );
    }

    #[test]
    fn only_the_health_check_the_page_and_its_sign_in_are_open() {
        let open: Vec<&str> = routes()
            .into_iter()
            .filter(|r| r.2 == Access::Open)
            .map(|r| r.0)
            .collect();
        assert_eq!(open, ["/healthz", "/", "/login"]);
    }
}
