//! What one authorization decision costs against 10, 1,000 and 10,000 AuthorizationPolicy
//! documents, and the check that it stays flat (within 2x from 10 to 10,000 policies).
//!
//! The policy sets are generated as YAML and read by `policy::doc::parse` outside the timed
//! loops: the root namespace's mesh-wide DENY, then up to 100 namespaces sharing the rest, each
//! with an allow-nothing, per-app ALLOW policies (`from.source.principals`, `to.operation`
//! methods, paths and ports), DENY policies on `/admin/*`, AUDIT policies and canary ALLOWs
//! selecting `version: v2`. Every set holds the same policies for the target workload (`app:
//! svc-0` in `ns-0`), so a larger set only adds policies that do not apply to it: its decision
//! should cost the same.
//!
//! `cargo bench -p mesh-benches --bench policy_decision` runs the criterion group
//! `decide/{l4,http_allow,http_deny}/{10,1000,10000}`, then the flatness check: per-decision
//! time at each size by a plain `Instant` loop (median of 5 runs), asserting the 10,000 figure
//! is within 2x of the 10 figure. Under `cargo test --benches` each benchmark runs once and the
//! timed check is skipped.

use std::{
    collections::BTreeMap, fmt::Write as _, hint::black_box, net::IpAddr, path::Path, time::Instant,
};

use criterion::{BenchmarkId, Criterion};
use http::HeaderMap;
use meshd::policy::{doc, Attrs, Decision, Http, PolicySet, Target, Unknown, Verdict};

const SIZES: [usize; 3] = [10, 1_000, 10_000];
/// Namespaces the non-root policies are spread over (fewer for small sets: ~10 per namespace).
const NAMESPACES: usize = 100;
const TRUST_DOMAIN: &str = "cluster.local";
/// The target workload's namespace, present at every size.
const TARGET_NS: &str = "ns-0";
/// Policies that apply to the target: the root DENY, the allow-nothing, svc-0's ALLOW, DENY
/// and AUDIT (its canary ALLOW shares the index bucket but selects `version: v2`).
const APPLICABLE: usize = 5;
/// Flatness check: decisions per timed run, and runs (the median is kept).
const ITERATIONS: u32 = 200_000;
const RUNS: usize = 5;
/// The acceptance: 10,000 policies cost at most this many times 10.
const MAX_RATIO: f64 = 2.0;

const HEADER: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n";

/// `n` AuthorizationPolicy documents, `---`-separated.
fn policy_yaml(n: usize) -> String {
    let mut out = String::new();
    root_deny(&mut out);
    let namespaces = (n / 10).clamp(1, NAMESPACES);
    let rest = n - 1;
    for ns in 0..namespaces {
        let count = rest / namespaces + usize::from(ns < rest % namespaces);
        namespace_policies(&mut out, &format!("ns-{ns}"), count);
    }
    out
}

/// The mesh-wide DENY in the root namespace: blocked address ranges and a quarantine namespace.
fn root_deny(out: &mut String) {
    let _ = write!(
        out,
        "---\n{HEADER}  name: deny-blocked-sources\n  namespace: istio-system\n\
         spec:\n  action: DENY\n  rules:\n\
         \x20 - from:\n    - source:\n        ipBlocks: [\"198.51.100.0/24\", \"203.0.113.0/24\"]\n\
         \x20 - from:\n    - source:\n        namespaces: [\"quarantine\"]\n"
    );
}

/// `count` policies of namespace `ns`: its allow-nothing, then per app `svc-J` an ALLOW, a DENY
/// on `/admin/*` (every third app), an AUDIT of order writes (every fifth) and a canary ALLOW
/// for `version: v2` (every fourth); app 0 has them all.
fn namespace_policies(out: &mut String, ns: &str, count: usize) {
    let mut docs = vec![format!(
        "---\n{HEADER}  name: allow-nothing\n  namespace: {ns}\nspec: {{}}\n"
    )];
    let mut app = 0;
    while docs.len() < count {
        docs.push(allow(ns, app));
        if app % 3 == 0 {
            docs.push(deny_admin(ns, app));
        }
        if app % 5 == 0 {
            docs.push(audit_orders(ns, app));
        }
        if app % 4 == 0 {
            docs.push(canary(ns, app));
        }
        app += 1;
    }
    docs.truncate(count);
    out.extend(docs);
}

fn selector(app: usize, version: Option<&str>) -> String {
    let mut s = format!("  selector:\n    matchLabels:\n      app: svc-{app}\n");
    if let Some(v) = version {
        let _ = writeln!(s, "      version: {v}");
    }
    s
}

/// `svc-J`'s callers: `svc-J+1` and the ingress gateway over HTTP on 8080, `batch` on the TCP
/// port 9000.
fn allow(ns: &str, app: usize) -> String {
    let td = TRUST_DOMAIN;
    format!(
        "---\n{HEADER}  name: svc-{app}-allow\n  namespace: {ns}\nspec:\n{sel}  action: ALLOW\n  rules:\n\
         \x20 - from:\n    - source:\n        principals:\n\
         \x20       - {td}/ns/{ns}/sa/svc-{next}\n\
         \x20       - {td}/ns/istio-ingress/sa/ingress-gateway\n\
         \x20   to:\n    - operation:\n        ports: [\"8080\"]\n\
         \x20       methods: [\"GET\", \"POST\"]\n        paths: [\"/api/*\", \"/healthz\"]\n\
         \x20 - from:\n    - source:\n        principals: [\"{td}/ns/{ns}/sa/batch\"]\n\
         \x20   to:\n    - operation:\n        ports: [\"9000\"]\n",
        sel = selector(app, None),
        next = app + 1,
    )
}

fn deny_admin(ns: &str, app: usize) -> String {
    let td = TRUST_DOMAIN;
    format!(
        "---\n{HEADER}  name: svc-{app}-deny-admin\n  namespace: {ns}\nspec:\n{sel}  action: DENY\n  rules:\n\
         \x20 - from:\n    - source:\n        notPrincipals: [\"{td}/ns/{ns}/sa/admin\"]\n\
         \x20   to:\n    - operation:\n        ports: [\"8080\"]\n        paths: [\"/admin/*\"]\n",
        sel = selector(app, None),
    )
}

fn audit_orders(ns: &str, app: usize) -> String {
    format!(
        "---\n{HEADER}  name: svc-{app}-audit-orders\n  namespace: {ns}\nspec:\n{sel}  action: AUDIT\n  rules:\n\
         \x20 - to:\n    - operation:\n        methods: [\"POST\", \"PUT\", \"DELETE\"]\n\
         \x20       paths: [\"/api/orders/*\"]\n",
        sel = selector(app, None),
    )
}

fn canary(ns: &str, app: usize) -> String {
    format!(
        "---\n{HEADER}  name: svc-{app}-canary\n  namespace: {ns}\nspec:\n{sel}  rules:\n\
         \x20 - from:\n    - source:\n        namespaces: [\"{ns}\"]\n\
         \x20   to:\n    - operation:\n        methods: [\"GET\"]\n",
        sel = selector(app, Some("v2")),
    )
}

/// One decision to time: who asks, on which port, with which request.
struct Scenario<'a> {
    name: &'static str,
    attrs: Attrs<'a>,
    unknown: Unknown,
    /// The verdict, reason and deciding policy it must get.
    expect: (Verdict, &'static str, &'static str),
}

/// A caller in the target's namespace (its principal names it) reaching `port`.
fn attrs<'a>(principal: &'a str, port: u16, http: Option<&'a Http<'a>>) -> Attrs<'a> {
    Attrs {
        principal: Some(principal),
        namespace: meshd::policy::query::namespace_of(principal),
        source_ip: IpAddr::from([10, 1, 0, 5]),
        destination_ip: IpAddr::from([10, 1, 0, 10]),
        destination_port: port,
        http,
    }
}

fn decide(set: &PolicySet, target: &Target, s: &Scenario) -> Decision {
    set.decide(black_box(target), black_box(&s.attrs), black_box(s.unknown))
}

/// Nanoseconds per decision over `ITERATIONS` of `decide_all` (which makes `per_call`
/// decisions), for each set; each set's median of `RUNS` runs, the runs taken in turn across
/// the sets so load from outside spreads over all of them alike.
fn per_decision_ns(sets: &[PolicySet], per_call: u32, decide_all: impl Fn(&PolicySet)) -> Vec<f64> {
    let mut runs = vec![Vec::with_capacity(RUNS); sets.len()];
    for _ in 0..RUNS {
        for (set, runs) in sets.iter().zip(&mut runs) {
            let start = Instant::now();
            for _ in 0..ITERATIONS {
                decide_all(set);
            }
            let total = start.elapsed().as_nanos() as f64;
            runs.push(total / f64::from(ITERATIONS * per_call));
        }
    }
    runs.into_iter()
        .map(|mut r| {
            r.sort_by(f64::total_cmp);
            r[RUNS / 2]
        })
        .collect()
}

/// The flatness check: every scenario, and the three in turn (the summary line).
fn check_flat(sets: &[PolicySet], target: &Target, scenarios: &[Scenario]) {
    let mut failed = Vec::new();
    let mut report = |name: &str, ns: &[f64]| {
        let ratio = ns[2] / ns[0];
        println!(
            "{name}: {} -> {:.0} ns, {} -> {:.0} ns, {} -> {:.0} ns (ratio {ratio:.2})",
            SIZES[0], ns[0], SIZES[1], ns[1], SIZES[2], ns[2]
        );
        if ratio > MAX_RATIO {
            failed.push(format!("{name}: ratio {ratio:.2}"));
        }
    };
    for s in scenarios {
        let ns = per_decision_ns(sets, 1, |set| {
            black_box(decide(set, target, s));
        });
        report(&format!("policy decision {}", s.name), &ns);
    }
    let ns = per_decision_ns(sets, scenarios.len() as u32, |set| {
        for s in scenarios {
            black_box(decide(set, target, s));
        }
    });
    report("policy decision", &ns);
    assert!(
        failed.is_empty(),
        "decision cost is not flat within {MAX_RATIO}x from {} to {} policies: {}",
        SIZES[0],
        SIZES[2],
        failed.join(", ")
    );
}

fn main() {
    let sets = parse_sets();

    let labels: BTreeMap<String, String> =
        [("app", "svc-0"), ("version", "v1"), ("team", "payments")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let target = Target {
        namespace: TARGET_NS,
        labels: &labels,
    };
    let headers = {
        let mut h = HeaderMap::new();
        h.insert("user-agent", "bench/1".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        h
    };
    let host = Some("svc-0.ns-0.svc.cluster.local:8080");
    let post_order = Http {
        method: "POST",
        path: "/api/orders/42",
        host,
        headers: &headers,
    };
    let get_admin = Http {
        method: "GET",
        path: "/admin/users",
        host,
        headers: &headers,
    };
    let scenarios = [
        Scenario {
            name: "l4",
            attrs: attrs("cluster.local/ns/ns-0/sa/batch", 9000, None),
            unknown: Unknown::AsTcp,
            expect: (Verdict::Allow, "allowed_by_policy", "ns-0/svc-0-allow"),
        },
        Scenario {
            name: "http_allow",
            attrs: attrs("cluster.local/ns/ns-0/sa/svc-1", 8080, Some(&post_order)),
            unknown: Unknown::Defer,
            expect: (Verdict::Allow, "allowed_by_policy", "ns-0/svc-0-allow"),
        },
        Scenario {
            name: "http_deny",
            attrs: attrs("cluster.local/ns/ns-0/sa/svc-1", 8080, Some(&get_admin)),
            unknown: Unknown::Defer,
            expect: (Verdict::Deny, "denied_by_policy", "ns-0/svc-0-deny-admin"),
        },
    ];

    check_decisions(&sets, &target, &scenarios);

    run_criterion(&sets, &target, &scenarios);

    // `cargo bench` passes --bench; `cargo test --benches` does not (one run each, no timing).
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list") {
        check_flat(&sets, &target, &scenarios);
    }
}

/// The generated policy sets, one per size, parsed (outside any timing).
fn parse_sets() -> Vec<PolicySet> {
    SIZES
        .iter()
        .map(|&n| {
            let yaml = policy_yaml(n);
            let start = Instant::now();
            let policies = doc::parse(&yaml, Path::new("generated.yaml"))
                .unwrap_or_else(|e| panic!("generated policies ({n}) do not parse: {e}"));
            assert_eq!(policies.len(), n, "generated policy count");
            let took = start.elapsed();
            println!("parsed {n} policies in {:.1} ms", took.as_secs_f64() * 1e3);
            PolicySet::new(policies)
        })
        .collect()
}

/// Every size decides alike, from the same applicable policies: only the cost may differ.
fn check_decisions(sets: &[PolicySet], target: &Target, scenarios: &[Scenario]) {
    for (set, n) in sets.iter().zip(SIZES) {
        assert_eq!(
            set.applicable(target).len(),
            APPLICABLE,
            "applicable at {n}"
        );
        for s in scenarios {
            let d = decide(set, target, s);
            let got = (d.verdict, d.reason, d.policy_id());
            let (verdict, reason, policy) = s.expect;
            assert_eq!(
                got,
                (verdict, reason, policy.to_string()),
                "{} at {n}",
                s.name
            );
            let audited = usize::from(s.name == "http_allow");
            assert_eq!(d.audited.len(), audited, "{} audits at {n}", s.name);
        }
    }
}

/// The criterion group `decide/{scenario}/{size}`.
fn run_criterion(sets: &[PolicySet], target: &Target, scenarios: &[Scenario]) {
    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("decide");
        for s in scenarios {
            for (set, n) in sets.iter().zip(SIZES) {
                group.bench_with_input(BenchmarkId::new(s.name, n), set, |b, set| {
                    b.iter(|| decide(set, target, s))
                });
            }
        }
        group.finish();
    }
    c.final_summary();
}
