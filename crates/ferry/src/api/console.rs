//! The web console's static files, shipped inside the binary: `GET /` (the
//! page) and `GET /console/{file}` (its one script and its style sheet).
//! They hold no data, so they are served without a token — beside
//! `/metrics` the only paths that are; every datum the page shows comes
//! from `/api/v1` with the session cookie. Every console response carries
//! a Content-Security-Policy that allows nothing but this origin's own
//! files (no inline script, no framing: a one-click switchover must not be
//! clickjacked), and `X-Frame-Options`, `X-Content-Type-Options`,
//! `Referrer-Policy` for older browsers.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The console's Content-Security-Policy.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const INDEX: &str = include_str!("../../console/index.html");

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file under `/console/`: name, content type, body. `app.js` holds
/// the session, the event stream and the shared helpers; each view has
/// its own script, loaded after it (`defer` keeps the order).
const FILES: &[(&str, &str, &str)] = &[
    ("app.js", JS, include_str!("../../console/app.js")),
    ("migrate.js", JS, include_str!("../../console/migrate.js")),
    ("estimate.js", JS, include_str!("../../console/estimate.js")),
    (
        "statistics.js",
        JS,
        include_str!("../../console/statistics.js"),
    ),
    (
        "configure.js",
        JS,
        include_str!("../../console/configure.js"),
    ),
    ("audit.js", JS, include_str!("../../console/audit.js")),
    ("app.css", CSS, include_str!("../../console/app.css")),
    ("print.css", CSS, include_str!("../../console/print.css")),
];

/// The security headers every console response carries.
pub fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /`.
pub async fn index() -> Response {
    secure(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response())
}

/// `GET /console/{file}`.
pub async fn file(Path(file): Path<String>) -> Response {
    match FILES.iter().find(|(name, _, _)| *name == file) {
        Some((_, ctype, body)) => secure(([(header::CONTENT_TYPE, *ctype)], *body).into_response()),
        None => secure((StatusCode::NOT_FOUND, "no such console file").into_response()),
    }
}
