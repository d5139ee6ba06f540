//! Helpers shared by the proxy's end-to-end tests.
#![allow(dead_code)]

use std::process::Command;

/// Fail (never skip) when a real tool the test drives is missing.
pub fn need(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "`{tool}` is not installed: run scripts/setup-proxy.sh");
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
