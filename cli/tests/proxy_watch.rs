//! `tollgate proxy --watch-ms`: a policy file changed under a running proxy takes effect for
//! the next query, without a restart (real dnsmasq upstream, real dig client, loopback only).
//! The fallback check runs every 10 minutes here, so only inotify can apply the changes within
//! the test's bounds (and the time it took is printed).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{DNS_ENDPOINTS, DNS_POLICY as POLICY, Reaped, dig_status as status, free_udp_port};

#[test]
fn a_changed_policy_file_applies_to_the_next_query() {
    common::need(&["dig", "dnsmasq"]);
    let up = free_udp_port();
    let _dnsmasq = common::dnsmasq(up);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("dns.yaml");
    std::fs::write(
        &policy,
        POLICY.replace("PATTERNS", "{matchPattern: \"*.example.com\"}"),
    )
    .unwrap();
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(&endpoints, DNS_ENDPOINTS).unwrap();
    let port = free_udp_port();
    let log = dir.path().join("proxy.log");
    let _proxy = Reaped(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["proxy", "--watch-ms", "600000", "--audit-log", "/dev/null"])
            .arg("--policies")
            .arg(&policy)
            .arg("--endpoints")
            .arg(&endpoints)
            .args(["--dns-listen", &format!("127.0.0.1:{port}")])
            .args(["--dns-to", &format!("kube-dns@127.0.0.1:{up}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while status(port, "api.example.com") != "NOERROR" {
        assert!(t.elapsed() < Duration::from_secs(10), "proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status(port, "db.example.org"), "REFUSED");

    std::fs::write(
        &policy,
        POLICY.replace(
            "PATTERNS",
            "{matchPattern: \"*.example.com\"}, {matchName: db.example.org}",
        ),
    )
    .unwrap();
    let t = Instant::now();
    while status(port, "db.example.org") != "NOERROR" {
        assert!(t.elapsed() < Duration::from_secs(5), "change not applied");
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "policy file written -> new policy answering: {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    // A file that does not parse keeps the last good policy.
    std::fs::write(&policy, "apiVersion: cilium.io/v2\nkind: [\n").unwrap();
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("keeping revision 2") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(port, "db.example.org"), "NOERROR");
    assert_eq!(status(port, "api.example.com"), "NOERROR");
}
