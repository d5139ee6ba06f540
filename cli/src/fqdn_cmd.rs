//! `tollgate fqdn list`: the proxy's FQDN cache (names learned from allowed DNS answers), read
//! from the proxy's `--metrics` address (`/fqdn`, JSON).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

#[derive(Debug, clap::Subcommand)]
pub enum FqdnCommand {
    /// Every learned (name, IP) with its remaining TTL and live connections.
    List {
        /// The proxy's `--metrics` address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        proxy: SocketAddr,
        /// Print the JSON the proxy returns.
        #[arg(long)]
        json: bool,
    },
}

fn fetch(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| {
        format!("connect to the proxy at {addr} (is it running with --metrics {addr}?)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /fqdn HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{addr}/fqdn: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

pub fn run(cmd: &FqdnCommand) -> Result<bool> {
    let FqdnCommand::List { proxy, json } = cmd;
    let body = fetch(*proxy)?;
    if *json {
        println!("{body}");
        return Ok(true);
    }
    let entries: Vec<serde_json::Value> = serde_json::from_str(&body).context("parse /fqdn")?;
    println!("{:<40} {:<40} {:>8} {:>5}", "NAME", "IP", "TTL", "CONNS");
    for e in &entries {
        let ttl = if e["expired"].as_bool() == Some(true) {
            "expired".to_string()
        } else {
            format!("{}s", e["ttl_remaining_secs"])
        };
        println!(
            "{:<40} {:<40} {:>8} {:>5}",
            e["name"].as_str().unwrap_or(""),
            e["ip"].as_str().unwrap_or(""),
            ttl,
            e["live_connections"]
        );
    }
    println!("{} entries", entries.len());
    Ok(true)
}
