//! The page against a fake device: what it shows, the break form, the same-origin rule,
//! the stills, and serving only to peers on the link.

use super::*;
use axum::body::Body;
use axum::http::Request;
use std::sync::Mutex;
use tower::ServiceExt;

#[derive(Default)]
struct Fake {
    on_break: Mutex<Option<String>>,
}

impl Device for Fake {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            device_id: "desk-7".into(),
            mode: "scheduled".into(),
            shift: "Mon-Fri 08:00-18:00 Europe/Berlin".into(),
            next_scan: Some("15:00".into()),
            shutter: "closed".into(),
            camera: "ok".into(),
            on_break: self.on_break.lock().unwrap().is_some(),
            on_call: false,
            retention: "7 days".into(),
            events: vec![
                EventRow {
                    id: "ev-2".into(),
                    time: "10:01".into(),
                    rules: "phone <script>x</script>".into(),
                    still: true,
                },
                EventRow { id: "ev-1".into(), time: "09:00".into(), rules: "paper".into(), still: false },
            ],
            audit: vec![AuditRow { time: "10:01".into(), result: "violation".into(), rules: "phone".into() }],
        }
    }
    fn still(&self, id: &str) -> Option<Vec<u8>> {
        (id == "ev-2").then(|| vec![0xff, 0xd8, 0xff, 0xd9])
    }
    fn start_break(&self, reason: &str) -> Result<(), String> {
        let mut b = self.on_break.lock().unwrap();
        if b.is_some() {
            return Err("already on a break".into());
        }
        *b = Some(reason.into());
        Ok(())
    }
    fn end_break(&self) -> Result<(), String> {
        self.on_break.lock().unwrap().take().map(|_| ()).ok_or_else(|| "no break in progress".into())
    }
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let r = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).header("host", "10.199.77.1").body(Body::empty()).unwrap()
}

fn post(path: &str, origin: Option<&str>, form: &str) -> Request<Body> {
    let mut r = Request::post(path)
        .header("host", "10.199.77.1")
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(o) = origin {
        r = r.header("origin", o);
    }
    r.body(Body::from(form.to_string())).unwrap()
}

fn app() -> (Arc<Fake>, Router) {
    let fake = Arc::new(Fake::default());
    (fake.clone(), router(fake).unwrap())
}

#[tokio::test]
async fn the_page_shows_state_events_and_checks_escaped_and_self_contained() {
    let (_, app) = app();
    let (status, headers, html) = call(&app, get("/")).await;
    assert_eq!(status, StatusCode::OK);
    for needle in
        ["scheduled", "Mon-Fri 08:00-18:00", "15:00", "closed", "7 days", "violation", "/still/ev-2.jpg"]
    {
        assert!(html.contains(needle), "{needle} missing");
    }
    assert!(html.contains("deleted from the camera"), "an event whose still is gone says so");
    assert!(!html.contains("<script"), "text from the device is escaped: {html}");
    assert!(html.contains("phone &lt;script&gt;"));
    // Nothing from elsewhere, nothing to run.
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"));
    let csp = headers.get("content-security-policy").unwrap().to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("form-action 'self'"), "{csp}");
    assert_eq!(headers.get("x-frame-options").unwrap(), "DENY");
    let (status, headers, css) = call(&app, get("/style.css")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("content-type").unwrap().to_str().unwrap().starts_with("text/css"));
    assert!(css.contains("font-family"));
}

#[tokio::test]
async fn a_break_starts_with_a_reason_from_this_page_and_ends() {
    let (fake, app) = app();
    let (status, _, html) =
        call(&app, post("/break", Some("http://10.199.77.1"), "reason=doctor%27s+call%0A")).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert_eq!(fake.on_break.lock().unwrap().as_deref(), Some("doctor's call"), "control characters dropped");
    assert!(html.contains("Your break has started") && html.contains("End the break"));
    let (status, _, html) = call(&app, post("/break", Some("http://10.199.77.1"), "reason=again")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(html.contains("already on a break"));
    let (status, _, _) = call(&app, post("/break/end", Some("http://10.199.77.1"), "")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(fake.on_break.lock().unwrap().is_none());
    // A reason is required, and has a limit.
    let (status, _, _) = call(&app, post("/break", Some("http://10.199.77.1"), "reason=+++")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let long = format!("reason={}", "x".repeat(MAX_REASON + 1));
    let (status, _, _) = call(&app, post("/break", Some("http://10.199.77.1"), &long)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(fake.on_break.lock().unwrap().is_none());
}

#[tokio::test]
async fn a_post_from_another_origin_or_without_one_is_refused() {
    let (fake, app) = app();
    for origin in [Some("http://evil.example"), Some("null"), Some("https://10.199.77.1"), None] {
        let (status, _, _) = call(&app, post("/break", origin, "reason=x")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{origin:?}");
    }
    let mut cross = post("/break", Some("http://10.199.77.1"), "reason=x");
    cross.headers_mut().insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
    assert_eq!(call(&app, cross).await.0, StatusCode::FORBIDDEN);
    assert!(fake.on_break.lock().unwrap().is_none(), "no break from elsewhere");
    // Read-only otherwise: no other method or route changes anything.
    let (status, _, _) = call(&app, Request::delete("/break").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn stills_are_served_while_held_and_ids_are_checked() {
    let (_, app) = app();
    let (status, headers, _) = call(&app, get("/still/ev-2.jpg")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers.get("content-type").unwrap(), "image/jpeg");
    for path in ["/still/ev-1.jpg", "/still/ev-2.png", "/still/..%2Fsecret.jpg", "/still/.jpg"] {
        assert_eq!(call(&app, get(path)).await.0, StatusCode::NOT_FOUND, "{path}");
    }
}

#[test]
fn networks() {
    let link = ("10.199.77.0".parse().unwrap(), 29);
    assert!(in_net("10.199.77.3".parse().unwrap(), link));
    assert!(!in_net("10.199.77.9".parse().unwrap(), link));
    assert!(!in_net("192.168.1.3".parse().unwrap(), link));
    assert!(!in_net("::1".parse().unwrap(), link));
    assert!(in_net("fe80::1".parse().unwrap(), ("fe80::".parse().unwrap(), 64)));
}

/// A real server on loopback: it answers peers on its link that ask for it by its
/// address, and refuses others (another name for the address: DNS rebinding).
#[tokio::test]
async fn the_server_answers_only_peers_on_its_link() {
    async fn fetch(addr: SocketAddr, host: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
    let loopback = ("127.0.0.0".parse().unwrap(), 8);
    for (link, host, want) in [
        (loopback, "127.0.0.1", "200 OK"),
        (loopback, "rebound.example", "421"),
        (("10.199.77.0".parse().unwrap(), 29), "127.0.0.1", "403"),
    ] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(addr, link, Arc::new(Fake::default()), async {
            let _ = rx.await;
        }));
        let mut answer = String::new();
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                answer = fetch(addr, host).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answer.lines().next().unwrap_or("").contains(want), "{link:?} {host}: {answer}");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }
}
