//! The worker's page (invariant 8 of the design): served by the box on the USB link to
//! the worker's PC and nowhere else. It shows the device's state, every check (the audit
//! log), every event sent about the worker within the retention period with its still
//! for as long as the device holds it, and a break button with a reason. It is read-only
//! otherwise; a POST from another origin is refused; it loads nothing from elsewhere and
//! needs no JavaScript.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

/// The longest break reason the page takes (characters).
pub const MAX_REASON: usize = 200;

/// What the page shows, read from the device when the page is asked for.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub device_id: String,
    pub mode: String,
    pub shift: String,
    pub next_scan: Option<String>,
    pub shutter: String,
    pub camera: String,
    pub on_break: bool,
    pub on_call: bool,
    /// How long events are kept ("7 days").
    pub retention: String,
    /// Newest first.
    pub events: Vec<EventRow>,
    /// Newest first.
    pub audit: Vec<AuditRow>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EventRow {
    /// The event id: letters, digits, '-' and '_' only (it is part of a URL).
    pub id: String,
    pub time: String,
    pub rules: String,
    /// The device still holds the still.
    pub still: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditRow {
    pub time: String,
    pub result: String,
    pub rules: String,
}

/// The device, as the page sees it.
pub trait Device: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
    /// The still of an event, if the device holds it (JPEG).
    fn still(&self, id: &str) -> Option<Vec<u8>>;
    /// Starts a break with the worker's reason; the reason it was refused.
    fn start_break(&self, reason: &str) -> Result<(), String>;
    fn end_break(&self) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("worker's page: {0}")]
    Template(#[from] minijinja::Error),
    #[error("worker's page on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

struct App {
    device: Arc<dyn Device>,
    env: minijinja::Environment<'static>,
}

const PAGE: &str = include_str!("../templates/page.html");
const STYLE: &str = include_str!("../templates/style.css");

/// The page's routes.
pub fn router(device: Arc<dyn Device>) -> Result<Router, PageError> {
    let mut env = minijinja::Environment::new();
    // HTML-escaped by its name.
    env.add_template("page.html", PAGE)?;
    let app = Arc::new(App { device, env });
    Ok(Router::new()
        .route("/", get(page))
        .route("/style.css", get(style))
        .route("/still/:file", get(still))
        .route("/break", post(start_break))
        .route("/break/end", post(end_break))
        .with_state(app))
}

/// Headers of every answer: nothing from elsewhere, no framing, no script, no caching.
fn secured(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not "no-referrer": under it a browser sends `Origin: null` with the page's own
    // form posts (Fetch, "serializing a request origin"), which same_origin refuses.
    // "same-origin" keeps the page's address from any other site all the same.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

fn render(app: &App, message: Option<&str>, status: StatusCode) -> Response {
    let html = app.env.get_template("page.html").and_then(|t| {
        t.render(
            minijinja::context! { s => app.device.snapshot(), message => message, max_reason => MAX_REASON },
        )
    });
    match html {
        Ok(html) => {
            secured((status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response())
        }
        Err(e) => {
            tracing::error!("worker's page: {e}");
            secured((StatusCode::INTERNAL_SERVER_ERROR, "the page could not be made").into_response())
        }
    }
}

/// The device is read and asked off the async threads (it reads files and waits for
/// the scan loop), so the MQTT link on the same runtime never waits for the page.
async fn blocking(f: impl FnOnce() -> Response + Send + 'static) -> Response {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| secured(StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

async fn page(State(app): State<Arc<App>>) -> Response {
    blocking(move || render(&app, None, StatusCode::OK)).await
}

async fn style() -> Response {
    secured(([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response())
}

async fn still(State(app): State<Arc<App>>, Path(file): Path<String>) -> Response {
    let Some(id) = file.strip_suffix(".jpg") else { return secured(StatusCode::NOT_FOUND.into_response()) };
    let valid = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let id = id.to_string();
    blocking(move || match app.device.still(&id).filter(|_| valid) {
        Some(jpeg) => secured(([(header::CONTENT_TYPE, "image/jpeg")], jpeg).into_response()),
        None => secured((StatusCode::NOT_FOUND, "the camera no longer holds this photo").into_response()),
    })
    .await
}

/// A POST must come from this page: its `Origin` is this host (browsers send it with
/// every form POST), and, where the browser says, the request is same-origin.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let (Some(origin), Some(host)) = (text(header::ORIGIN), text(header::HOST)) else { return false };
    let site_ok = text(header::HeaderName::from_static("sec-fetch-site")).is_none_or(|s| s == "same-origin");
    site_ok && origin == format!("http://{host}")
}

#[derive(Deserialize)]
struct BreakForm {
    reason: String,
}

async fn start_break(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<BreakForm>,
) -> Response {
    if !same_origin(&headers) {
        return secured((StatusCode::FORBIDDEN, "refused: not sent from this page").into_response());
    }
    // One line of printable text: it goes into the device's audit log.
    let reason: String =
        form.reason.chars().filter(|c| !c.is_control()).collect::<String>().trim().to_string();
    blocking(move || {
        if reason.is_empty() || reason.chars().count() > MAX_REASON {
            return render(
                &app,
                Some("Please give a reason (at most 200 characters)."),
                StatusCode::BAD_REQUEST,
            );
        }
        match app.device.start_break(&reason) {
            Ok(()) => render(&app, Some("Your break has started: the camera does not look."), StatusCode::OK),
            Err(why) => render(&app, Some(&format!("The break did not start: {why}")), StatusCode::CONFLICT),
        }
    })
    .await
}

async fn end_break(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return secured((StatusCode::FORBIDDEN, "refused: not sent from this page").into_response());
    }
    blocking(move || match app.device.end_break() {
        Ok(()) => render(&app, Some("Your break has ended."), StatusCode::OK),
        Err(why) => render(&app, Some(&format!("The break did not end: {why}")), StatusCode::CONFLICT),
    })
    .await
}

/// Serves the page on `addr` (the USB link's address) until `stop` resolves, answering
/// only peers on `link` (the link's network: a packet from elsewhere that reached this
/// address is refused). Binding is retried while the address is not there yet (the
/// link comes up when the PC is plugged in).
pub async fn serve(
    addr: SocketAddr,
    link: (IpAddr, u8),
    device: Arc<dyn Device>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), PageError> {
    // The page's own address as the Host (with or without the port): a name that a site
    // of another origin rebinds to this address (DNS rebinding) would pass the origin
    // check. Made once, not per request.
    let own_hosts: Arc<[String; 2]> = Arc::new([addr.ip().to_string(), addr.to_string()]);
    let app = router(device)?.layer(axum::middleware::from_fn(
        move |ConnectInfo(peer): ConnectInfo<SocketAddr>,
              req: axum::extract::Request,
              next: axum::middleware::Next| {
            let own_hosts = own_hosts.clone();
            async move {
                if !in_net(peer.ip(), link) {
                    tracing::warn!("worker's page: refused {peer}, not on the USB link");
                    return secured(
                        (StatusCode::FORBIDDEN, "refused: this page is served only over the USB cable")
                            .into_response(),
                    );
                }
                let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
                if !own_hosts.iter().any(|h| h == host) {
                    return secured(
                        (StatusCode::MISDIRECTED_REQUEST, "refused: ask for this page by its address")
                            .into_response(),
                    );
                }
                next.run(req).await
            }
        },
    ));
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(PageError::Bind { addr, source: e }),
        }
    };
    tracing::info!("worker's page on http://{addr}/");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stop)
        .await
        .map_err(|e| PageError::Bind { addr, source: e })
}

/// Whether `ip` is in the network `net`/`prefix`.
pub fn in_net(ip: IpAddr, (net, prefix): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
