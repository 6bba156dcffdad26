//! An upstream that a proxy variable applies to is called through the proxy (by reqwest; the
//! lean client takes only unproxied plain-HTTP upstreams). The real binary runs with its own
//! environment, so the variables reach no other test.

use crate::fake_upstream::{FakeUpstream, Kind};
use crate::restart::{Server, free_port, submit_unique_jobs, wait_succeeded};

#[tokio::test]
async fn a_proxied_upstream_is_called_through_the_proxy() {
    // The fake stands in for the proxy (it routes on the path of the absolute-form URI a proxy
    // is sent); the upstream's own host does not exist, so only the proxy can answer.
    let fake = FakeUpstream::start().await;
    let proxy = format!("http://{}", fake.addr);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("HTTP_PROXY", proxy.as_str()),
        ("http_proxy", proxy.as_str()),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
    ];
    let db = dir.path().join("fusion.db");
    let server = Server::start_with(&db, "http://upstream.invalid/v1", free_port(), &env).await;
    let client = reqwest::Client::new();
    let ids = submit_unique_jobs(&client, &server, "px", 1).await;
    let job = wait_succeeded(&client, &server, &ids[0], 20).await;
    assert_eq!(job["panel"][0]["content"], "panel answer from px0-a");
    assert_eq!(fake.calls("px0-a", Kind::Panel), 1);
    assert_eq!(fake.calls("px0-judge", Kind::Final), 1);
    assert_eq!(fake.calls_with_depth_header(), 5);
}
