//! A webhook receiver for trying the worker out: prints every request it gets (method,
//! path, the Standard Webhooks headers and the body) and answers with a fixed status.
//!
//!     cargo run --example receiver -- 127.0.0.1:9000 204

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9000".into());
    let status: u16 = args
        .next()
        .map_or(204, |s| s.parse().expect("the status is a number"));
    let status = StatusCode::from_u16(status).expect("a valid HTTP status");
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| async move {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            println!(
                "{method} {uri} webhook-id={} webhook-timestamp={} webhook-signature={} body={}",
                header("webhook-id"),
                header("webhook-timestamp"),
                header("webhook-signature"),
                String::from_utf8_lossy(&body)
            );
            status
        },
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("receiving on http://{addr}, answering {status}");
    axum::serve(listener, app).await
}
