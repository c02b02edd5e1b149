//! `meshd status`: the essentials of a running meshd, read from its admin API
//! (`/config_dump`), for a person at a terminal.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

pub fn print(admin: SocketAddr) -> Result<()> {
    let dump = fetch(admin, "/config_dump")?;
    let dump: Value = serde_json::from_str(&dump).context("/config_dump is not JSON")?;
    print!("{}", render(&dump));
    Ok(())
}

/// `GET path` on the admin API; the body of a 200 answer.
pub fn fetch(admin: SocketAddr, path: &str) -> Result<String> {
    let mut conn = TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        .with_context(|| format!("no meshd admin API at {admin}: is meshd running?"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        bail!("{path}: {status}");
    }
    Ok(body.to_string())
}

fn render(dump: &Value) -> String {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let mut out = format!(
        "meshd {}  mode: {}\n",
        s(&dump["version"]),
        s(&dump["mode"])
    );
    match dump["ready"].as_bool() {
        Some(true) => out += "ready: yes\n",
        _ => out += &format!("ready: no ({})\n", s(&dump["not_ready_reason"])),
    }
    out += &format!("interception: {}\n", s(&dump["interception"]));
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    out += "workloads:\n";
    for w in list(&dump["workloads"]) {
        let w = &w["workload"];
        let ports: Vec<String> = (list(&w["ports"]).iter())
            .map(|p| format!("{}/{}", p["port"], s(&p["protocol"])))
            .collect();
        out += &format!(
            "  {}/{}  {}  ports {}\n",
            s(&w["namespace"]),
            s(&w["name"]),
            s(&w["spiffe_id"]),
            ports.join(",")
        );
    }
    out += &format!("pods: {}\n", list(&dump["pods"]).len());
    for p in list(&dump["pods"]) {
        out += &format!(
            "  {}/{}  {}\n",
            s(&p["namespace"]),
            s(&p["name"]),
            s(&p["ip"])
        );
    }
    out += &format!("policies: {}\n", list(&dump["policies"]).len());
    out += "certificates:\n";
    for c in list(&dump["certificates"]) {
        out += &format!(
            "  {}  serial {}  expires in {}s\n",
            s(&c["spiffe_id"]),
            s(&c["serial"]),
            c["expires_in_seconds"]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dump_renders_its_essentials() {
        let dump = serde_json::json!({
            "version": "0.1.0", "mode": "ebpf", "ready": false,
            "not_ready_reason": "draining: meshd is stopping", "interception": "ok",
            "workloads": [{"workload": {"name": "web", "namespace": "shop",
                "spiffe_id": "spiffe://td/ns/shop/sa/web",
                "ports": [{"port": 8080, "protocol": "http"}]}}],
            "pods": [], "policies": [{}],
            "certificates": [{"spiffe_id": "spiffe://td/ns/shop/sa/web", "serial": "0a",
                "expires_in_seconds": 3600}],
        });
        let text = super::render(&dump);
        assert!(text.contains("ready: no (draining"), "{text}");
        assert!(
            text.contains("shop/web  spiffe://td/ns/shop/sa/web  ports 8080/http"),
            "{text}"
        );
        assert!(text.contains("policies: 1"), "{text}");
        assert!(text.contains("expires in 3600s"), "{text}");
    }
}
