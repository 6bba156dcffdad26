//! The official OpenAI Python SDK (`tests/openai_sdk/client.py`) against the real server: a
//! plain call, plugins in `extra_body`, a call the SDK retries on its own after its timeout, a
//! stream, `models.list()`, and errors raising the SDK's exception types.

use crate::fake_upstream::{Kind, Reply};
use crate::helpers::spawn_app;

#[tokio::test]
async fn the_openai_python_sdk_works_unchanged() {
    let has_sdk = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_sdk {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install tests/openai_sdk/requirements.txt"
        );
        eprintln!("skipped: the openai Python package is not installed");
        return;
    }
    let app = spawn_app().await;
    app.fake.script(
        "slow-sdk",
        Kind::Panel,
        vec![Reply::Delay(1_500, Box::new(Reply::Ok))],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk/client.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("{}/v1", app.address))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client.py failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("passed, 0 failed"), "{stdout}");
    // The SDK's retries of the call it gave up on waited on the first try's job.
    assert_eq!(app.fake.calls("slow-sdk", Kind::Panel), 1);
}
