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
const APP_JS: &str = include_str!("../../console/app.js");
const APP_CSS: &str = include_str!("../../console/app.css");

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
    let (ctype, body) = match file.as_str() {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        _ => {
            return secure((StatusCode::NOT_FOUND, "no such console file").into_response());
        }
    };
    secure(([(header::CONTENT_TYPE, ctype)], body).into_response())
}
