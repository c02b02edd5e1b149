use std::path::Path;

use http::HeaderMap;

use super::*;

fn set(yaml: &str) -> PolicySet {
    PolicySet::new(doc::parse(yaml, Path::new("test.yaml")).expect("valid policies"))
}

fn error(yaml: &str) -> String {
    doc::parse(yaml, Path::new("p.yaml"))
        .expect_err("invalid policy")
        .to_string()
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

/// Decides a call from `foo/sleep` to `app` in namespace `ns`, as TCP or as a request.
fn decide(set: &PolicySet, ns: &str, app: &str, req: Option<(&str, &str)>) -> Verdict {
    let labels = labels(app);
    let headers = HeaderMap::new();
    let http = req.map(|(method, path)| Http {
        method,
        path,
        host: None,
        headers: &headers,
    });
    let attrs = Attrs {
        principal: Some("cluster.local/ns/foo/sa/sleep"),
        namespace: Some("foo"),
        source_ip: "10.0.0.1".parse().unwrap(),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 8000,
        http: http.as_ref(),
    };
    let target = Target {
        namespace: ns,
        labels: &labels,
    };
    set.decide(&target, &attrs, Unknown::AsTcp).verdict
}

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

#[test]
fn no_policy_allows_and_allow_nothing_denies() {
    assert_eq!(decide(&set(""), "foo", "a", None), Verdict::Allow);
    let nothing = format!("{HEAD}metadata: {{name: allow-nothing, namespace: foo}}\nspec: {{}}\n");
    assert_eq!(decide(&set(&nothing), "foo", "a", None), Verdict::Deny);
    assert_eq!(decide(&set(&nothing), "bar", "a", None), Verdict::Allow);
}

#[test]
fn deny_beats_allow_and_audit_only_logs() {
    let yaml = format!(
        "{HEAD}metadata: {{name: all, namespace: foo}}\nspec: {{rules: [{{}}]}}\n---\n\
         {HEAD}metadata: {{name: no-delete, namespace: istio-system}}\n\
         spec: {{action: DENY, rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]}}\n---\n\
         {HEAD}metadata: {{name: audit, namespace: foo}}\nspec: {{action: AUDIT, rules: [{{}}]}}\n"
    );
    let set = set(&yaml);
    assert_eq!(decide(&set, "foo", "a", Some(("GET", "/"))), Verdict::Allow);
    assert_eq!(
        decide(&set, "foo", "a", Some(("DELETE", "/"))),
        Verdict::Deny
    );
    // A TCP connection: the DENY rule's HTTP fields are ignored, so it denies.
    assert_eq!(decide(&set, "foo", "a", None), Verdict::Deny);
}

#[test]
fn selectors_pick_workloads_and_http_allow_rules_never_match_tcp() {
    let yaml = format!(
        "{HEAD}metadata: {{name: get-only, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  \
         rules: [{{to: [{{operation: {{methods: [GET], paths: [\"/api/*\"]}}}}]}}]\n"
    );
    let set = set(&yaml);
    assert_eq!(
        decide(&set, "foo", "httpbin", Some(("GET", "/api/x"))),
        Verdict::Allow
    );
    assert_eq!(
        decide(&set, "foo", "httpbin", Some(("GET", "/apix"))),
        Verdict::Deny
    );
    assert_eq!(decide(&set, "foo", "httpbin", None), Verdict::Deny);
    assert_eq!(
        decide(&set, "foo", "other", Some(("POST", "/"))),
        Verdict::Allow
    );
}

#[test]
fn an_l7_port_defers_what_only_requests_can_tell() {
    let yaml = format!(
        "{HEAD}metadata: {{name: get-only, namespace: foo}}\n\
         spec: {{rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]}}\n"
    );
    let set = set(&yaml);
    let labels = labels("a");
    let target = Target {
        namespace: "foo",
        labels: &labels,
    };
    let attrs = Attrs {
        principal: None,
        namespace: None,
        source_ip: "10.0.0.1".parse().unwrap(),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 80,
        http: None,
    };
    let d = set.decide(&target, &attrs, Unknown::Defer);
    assert_eq!(d.verdict, Verdict::PerRequest);
    assert_eq!(d.policy_id(), "foo/get-only");
}

#[test]
fn unsupported_and_unknown_fields_name_file_line_and_field() {
    let unknown = error(&format!(
        "# comment\n{HEAD}metadata: {{name: x}}\nspec:\n  rules:\n  - to:\n    - operation:\n        method: [GET]\n"
    ));
    assert!(
        unknown.starts_with("p.yaml:9: spec.rules[0].to[0].operation: unknown field `method`"),
        "{unknown}"
    );
    assert!(!unknown.contains("column"), "{unknown}");
    let custom = error(&format!(
        "---\n{HEAD}metadata: {{name: x}}\nspec: {{action: CUSTOM}}\n"
    ));
    assert!(
        custom.starts_with("p.yaml:2: spec.action: CUSTOM"),
        "{custom}"
    );
    let target = error(&format!(
        "{HEAD}metadata: {{name: x}}\nspec: {{targetRefs: []}}\n"
    ));
    assert!(
        target.contains("spec.targetRefs: not supported"),
        "{target}"
    );
    let jwt = error(&format!(
        "{HEAD}metadata: {{name: x}}\nspec: {{rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]}}\n"
    ));
    assert!(
        jwt.contains("spec.rules[0].from[0].source.requestPrincipals"),
        "{jwt}"
    );
    let star = error(&format!(
        "{HEAD}metadata: {{name: x}}\nspec: {{rules: [{{to: [{{operation: {{paths: [\"/a/*/b\"]}}}}]}}]}}\n"
    ));
    assert!(
        star.contains("spec.rules[0].to[0].operation.paths[0]"),
        "{star}"
    );
    let key = error(&format!(
        "{HEAD}metadata: {{name: x}}\nspec: {{rules: [{{when: [{{key: \"request.auth.claims[iss]\", values: [a]}}]}}]}}\n"
    ));
    assert!(key.contains("spec.rules[0].when[0].key"), "{key}");
    let kind =
        error("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\n");
    assert!(kind.contains("kind"), "{kind}");
}

#[test]
fn duplicate_names_across_files_are_refused() {
    let dir = std::env::temp_dir().join(format!("meshd-policy-dup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let doc = format!("{HEAD}metadata: {{name: x, namespace: foo}}\n");
    std::fs::write(dir.join("a.yaml"), &doc).unwrap();
    std::fs::write(dir.join("b.yml"), &doc).unwrap();
    std::fs::write(dir.join(".hidden.yaml"), "garbage: [").unwrap();
    let err = doc::load(std::slice::from_ref(&dir))
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        err.contains("b.yml:1: policy foo/x is also defined at"),
        "{err}"
    );
}
