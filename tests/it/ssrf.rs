//! Non-global destinations are refused before any connection, in every spelling, and no
//! proxy from the environment is used. Only loopback is ever a target here; the other
//! ranges are covered by the classifier's unit tests.

use std::time::Duration;

use crate::harness::{Receiver, Reply, TestEnv, WebhookSpec, WorkerProcess, event};

#[tokio::test]
async fn loopback_in_any_spelling_is_blocked_without_a_request() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let port = rx.addr.port();
    rx.url("hook", vec![Reply::Status(200)]);
    let urls = [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://localhost:{port}/hook"),
        format!("http://2130706433:{port}/hook"),
        format!("http://0x7f.0.0.1:{port}/hook"),
        format!("http://0177.0.0.01:{port}/hook"),
        format!("http://127.1:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        format!("http://[::]:{port}/hook"),
        format!("http://0:{port}/hook"),
    ];
    let mut hooks = Vec::new();
    for url in &urls {
        hooks.push((env.add_webhook(WebhookSpec::new("p", "t", url)).await, url));
    }
    let worker = env.start_worker(&["--allow-private-ips", "false"]).await;
    let (id, body) = event("p", "t", serde_json::json!({}));
    env.publish(&body).await;

    for (hook, url) in hooks {
        let d = env
            .wait_for_status(hook, id, &["permanently_failed"], Duration::from_secs(10))
            .await;
        assert_eq!(
            d.error_type.as_deref(),
            Some("BLOCKED_DESTINATION"),
            "{url}"
        );
        assert_eq!(d.attempts, 1, "{url}: refused once, never retried");
        assert!(d.error_message.unwrap().contains("non-global"), "{url}");
        assert_eq!(env.webhook(hook).await.consecutive_failures, 1);
    }
    assert!(
        rx.seen("hook").is_empty(),
        "no request may reach a loopback receiver"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn proxies_from_the_environment_are_ignored() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let proxy = Receiver::start().await;
    let hook = env
        .add_webhook(WebhookSpec::new(
            "p",
            "t",
            &rx.url("hook", vec![Reply::Status(200)]),
        ))
        .await;
    let proxy_url = format!("http://{}", proxy.addr);
    env.declare_topology().await;
    let worker = WorkerProcess::spawn(
        &env,
        &[
            ("HTTP_PROXY", proxy_url.as_str()),
            ("http_proxy", proxy_url.as_str()),
            ("ALL_PROXY", proxy_url.as_str()),
        ],
    );
    let (id, body) = event("p", "t", serde_json::json!({}));
    env.publish(&body).await;
    let d = env
        .wait_for_status(hook, id, &["delivered", "failed"], Duration::from_secs(20))
        .await;
    drop(worker); // killed
    assert_eq!(d.status, "delivered");
    assert_eq!(rx.seen("hook").len(), 1);
    assert!(
        proxy.seen("hook").is_empty(),
        "the request went through the proxy"
    );
}
