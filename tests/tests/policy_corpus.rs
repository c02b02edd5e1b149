//! The AuthorizationPolicy corpus under tests/policies: policies copied from Istio's reference
//! and task pages (and the sidecar article's www/db/auth set), each loaded with meshd's parser,
//! and every case their pages describe decided by meshd. See tests/policies/README.md.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use meshd::policy::{
    doc,
    query::{Query, RequestQuery},
    PolicySet, Verdict,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    policy: Files,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Files {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    why: String,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    ip: Option<std::net::IpAddr>,
    to: To,
    port: u16,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    expect: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct To {
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Case {
    fn query(&self) -> Query {
        let request = (self.method.is_some() || self.path.is_some()).then(|| RequestQuery {
            method: self.method.clone().unwrap_or_else(|| "GET".into()),
            path: self.path.clone().unwrap_or_else(|| "/".into()),
            host: self.host.clone(),
            headers: (self.headers.iter())
                .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
                .collect(),
        });
        Query {
            principal: self.from.clone().filter(|f| !f.is_empty()),
            source_ip: self.ip.unwrap_or([10, 0, 0, 1].into()),
            namespace: self.to.namespace.clone(),
            labels: self.to.labels.clone(),
            port: self.port,
            request,
        }
    }
}

/// Runs every case of `cases` (policy paths relative to `dir`); returns the failures, described.
fn run(dir: &Path, cases: &str) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(corpus().join(cases)).unwrap();
    let entries: Vec<Entry> = serde_yaml_ng::from_str(&text).expect("cases.yaml parses");
    let mut failures = Vec::new();
    let mut count = 0;
    for entry in entries {
        let files: Vec<PathBuf> = match &entry.policy {
            Files::One(f) => vec![dir.join(f)],
            Files::Many(fs) => fs.iter().map(|f| dir.join(f)).collect(),
        };
        let set = PolicySet::new(doc::load(&files).unwrap_or_else(|e| panic!("{e}")));
        for case in &entry.cases {
            count += 1;
            let decision = case.query().decide(&set);
            let got = match decision.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
                Verdict::PerRequest => "per-request",
            };
            if got != case.expect {
                failures.push(format!(
                    "{files:?}: {} -> {}/{:?} port {} {:?} {:?}: expected {}, got {got} ({} by {}) -- {}",
                    case.from.as_deref().unwrap_or("(plaintext)"),
                    case.to.namespace,
                    case.to.labels,
                    case.port,
                    case.method,
                    case.path,
                    case.expect,
                    decision.reason,
                    decision.policy_id(),
                    case.why
                ));
            }
        }
    }
    (count, failures)
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// Every case of `cases` holds (at least `min` of them, so a truncated table fails too).
fn assert_cases(dir: &Path, cases: &str, min: usize) {
    let (count, failures) = run(dir, cases);
    assert!(count >= min, "only {count} cases");
    let failed = failures.len();
    assert!(
        failures.is_empty(),
        "{failed} of {count} cases failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn istio_documentation_policies_behave_as_their_pages_say() {
    assert_cases(&corpus(), "istio.cases.yaml", 150);
}

#[test]
fn the_sidecar_articles_www_db_auth_matrix_holds() {
    assert_cases(
        &corpus().join("sidecar-article"),
        "sidecar-article.cases.yaml",
        20,
    );
}

#[test]
fn every_istio_example_loads() {
    let files = doc::files_of(&corpus().join("istio")).unwrap();
    assert!(files.len() >= 30);
    for f in files {
        doc::load(&[f]).unwrap_or_else(|e| panic!("{e}"));
    }
}
