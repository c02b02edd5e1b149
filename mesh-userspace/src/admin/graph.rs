//! `/graph` and `/graph.json`: the workload-to-workload edges this meshd has seen, drawn live.
//! The edges come from Istio's standard metrics (the same figures a scraper gets): who called
//! whom, under which identities, over mTLS or not, how many connections and bytes, how many
//! requests and denials. The page is self-contained (no external assets, works offline) and
//! computes rates from successive polls.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One edge's figures, as one reporter saw them.
#[derive(Default, Clone, Copy)]
struct Figures {
    opened: f64,
    closed: f64,
    bytes: f64,
    requests: f64,
    denied: f64,
}

impl Figures {
    fn max(self, o: Figures) -> Figures {
        Figures {
            opened: self.opened.max(o.opened),
            closed: self.closed.max(o.closed),
            bytes: self.bytes.max(o.bytes),
            requests: self.requests.max(o.requests),
            denied: self.denied.max(o.denied),
        }
    }
}

/// An edge: identities where known (what both reporters agree on), names for display.
#[derive(Default)]
struct Edge {
    source_name: String,
    destination_name: String,
    by_reporter: BTreeMap<String, Figures>,
}

/// The edges in the exposition text of meshd's metrics.
pub fn edges(exposition: &str) -> Value {
    let mut edges: BTreeMap<(String, String, bool), Edge> = BTreeMap::new();
    for line in exposition.lines() {
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        let add: fn(&mut Figures, f64, &BTreeMap<String, String>) = match name {
            "istio_tcp_connections_opened_total" => |f, v, _| f.opened += v,
            "istio_tcp_connections_closed_total" => |f, v, l| {
                f.closed += v;
                if l.get("response_flags").is_some_and(|x| x == "RBAC") {
                    f.denied += v;
                }
            },
            "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" => {
                |f, v, _| f.bytes += v
            }
            "istio_requests_total" => |f, v, l| {
                f.requests += v;
                if l.get("response_flags").is_some_and(|x| x == "RBAC") {
                    f.denied += v;
                }
            },
            _ => continue,
        };
        let get = |k: &str| labels.get(k).map_or("unknown", String::as_str);
        let party = |side: &str| {
            let workload = get(&format!("{side}_workload"));
            let name = match workload {
                "unknown" => None,
                w => Some(format!(
                    "{}/{w}",
                    get(&format!("{side}_workload_namespace"))
                )),
            };
            let principal = get(&format!("{side}_principal")).to_string();
            let key = match principal.as_str() {
                "unknown" => name.clone().unwrap_or_else(|| "unknown".into()),
                _ => principal.clone(),
            };
            (key, name.unwrap_or(principal))
        };
        let (source, source_name) = party("source");
        let (destination, destination_name) = party("destination");
        let mtls = get("connection_security_policy") == "mutual_tls";
        let edge = edges.entry((source, destination, mtls)).or_default();
        // A workload name beats a principal for display, whichever reporter brings it.
        for (kept, seen) in [
            (&mut edge.source_name, source_name),
            (&mut edge.destination_name, destination_name),
        ] {
            if kept.is_empty() || kept.starts_with("spiffe://") || kept == "unknown" {
                *kept = seen;
            }
        }
        add(
            edge.by_reporter.entry(get("reporter").into()).or_default(),
            value,
            &labels,
        );
    }
    let list: Vec<Value> = edges
        .into_iter()
        .map(|((source, destination, mtls), e)| {
            // Both sides on this node report the same connections: take the larger account.
            let f = e
                .by_reporter
                .values()
                .fold(Figures::default(), |a, b| a.max(*b));
            json!({
                "source": e.source_name, "destination": e.destination_name,
                "source_principal": source, "destination_principal": destination,
                "mtls": mtls, "opened": f.opened, "active": (f.opened - f.closed).max(0.0),
                "bytes": f.bytes, "requests": f.requests, "denied": f.denied,
            })
        })
        .collect();
    json!({ "edges": list })
}

/// `name{k="v",...} value` → (name, labels, value); `None` for comments and other lines.
fn sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (name, rest) = line.split_once('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let value: f64 = value.split(' ').next()?.parse().ok()?;
    Some((name, label_pairs(labels)?, value))
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes in values.
fn label_pairs(text: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return Some(out);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// The page: polls `/graph.json` every 2 s, draws workloads on a circle and edges between them
/// (green: mTLS, red: plaintext), with connection and byte rates and denials; the same edges
/// are listed in a table.
pub const PAGE: &str = include_str!("graph.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_merge_reporters_and_count_denials() {
        let text = r#"# HELP x
istio_tcp_connections_opened_total{reporter="source",source_workload="checkout",source_workload_namespace="shop",source_principal="spiffe://td/ns/shop/sa/checkout",destination_workload="unknown",destination_workload_namespace="shop",destination_principal="spiffe://td/ns/shop/sa/orders",connection_security_policy="mutual_tls",response_flags="-"} 3
istio_tcp_connections_opened_total{reporter="destination",source_workload="unknown",source_workload_namespace="shop",source_principal="spiffe://td/ns/shop/sa/checkout",destination_workload="orders",destination_workload_namespace="shop",destination_principal="spiffe://td/ns/shop/sa/orders",connection_security_policy="mutual_tls",response_flags="-"} 3
istio_tcp_connections_closed_total{reporter="destination",source_workload="unknown",source_workload_namespace="shop",source_principal="spiffe://td/ns/shop/sa/checkout",destination_workload="orders",destination_workload_namespace="shop",destination_principal="spiffe://td/ns/shop/sa/orders",connection_security_policy="mutual_tls",response_flags="RBAC"} 1
istio_tcp_received_bytes_total{reporter="destination",source_workload="unknown",source_workload_namespace="a\"b",source_principal="unknown",destination_workload="orders",destination_workload_namespace="shop",destination_principal="spiffe://td/ns/shop/sa/orders",connection_security_policy="none",response_flags="-"} 42
"#;
        let graph = edges(text);
        let list = graph["edges"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{graph:#}");
        let by_mtls = |m: bool| list.iter().find(|e| e["mtls"] == m).unwrap();
        let plain = by_mtls(false);
        assert_eq!(plain["source"], "unknown");
        assert_eq!(plain["bytes"], 42.0);
        let mtls = by_mtls(true);
        assert_eq!(mtls["source"], "shop/checkout");
        assert_eq!(mtls["destination"], "shop/orders");
        assert_eq!(
            mtls["opened"], 3.0,
            "the two reporters' accounts are not added"
        );
        assert_eq!(mtls["denied"], 1.0);
        assert_eq!(mtls["active"], 2.0);
    }

    #[test]
    fn label_values_unescape() {
        let labels = label_pairs(r#"a="x\"y",b="\\",c="""#).unwrap();
        assert_eq!(labels["a"], "x\"y");
        assert_eq!(labels["b"], "\\");
        assert_eq!(labels["c"], "");
    }
}
