//! `cargo xtask setup` on a machine that already has everything changes nothing.

use std::process::Command;

use testhosts::sibling_binary;

#[test]
fn setup_on_a_ready_machine_installs_nothing() {
    // `cargo xtask test` ran setup just before the tests, so everything is in place now.
    let out = Command::new(sibling_binary("xtask"))
        .arg("setup")
        .output()
        .expect("run xtask setup");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("installing"), "{text}");
    assert!(!text.contains("building"), "{text}");
    assert!(text.contains("everything is in place"), "{text}");
}
