//! Authorization policy shaped like Istio's `AuthorizationPolicy` (security.istio.io v1 and
//! v1beta1): documents are read by [`doc`], compiled to [`rule::Rule`]s and indexed here by
//! namespace and selector label, so the policies that apply to one workload are found without
//! walking the others. A decision follows Istio's order: AUDIT policies log, a matching DENY
//! denies, then if any ALLOW policy applies one of its rules has to match; with none applying,
//! the connection is allowed.

pub mod doc;
pub mod explain;
pub mod matcher;
pub mod query;
pub mod reload;
pub mod rule;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::PathBuf,
    sync::Arc,
};

pub use rule::{Attrs, Http, Tri};

use crate::config::mesh::ROOT_NAMESPACE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// One compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    /// `selector.matchLabels`; `None` selects every workload of the namespace (of the mesh, in
    /// the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: Vec<rule::Rule>,
    /// Where it was read: file and the line its document starts on.
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

impl Policy {
    /// `namespace/name`, how logs and metrics name it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn selects(&self, target: &Target) -> bool {
        let in_scope = self.namespace == ROOT_NAMESPACE || self.namespace == target.namespace;
        in_scope
            && self.selector.as_ref().is_none_or(|sel| {
                sel.iter()
                    .all(|(k, v)| target.labels.get(k).is_some_and(|l| l == v))
            })
    }

    /// The first rule that matches, and how.
    fn matching_rule(&self, attrs: &Attrs) -> Option<(usize, Tri)> {
        let mut unknown = None;
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.eval(attrs) {
                Tri::Yes => return Some((i, Tri::Yes)),
                Tri::Unknown if unknown.is_none() => unknown = Some((i, Tri::Unknown)),
                _ => {}
            }
        }
        unknown
    }
}

/// The workload a connection is for.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// What to do with rules that need HTTP attributes when there are none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// A TCP port: as Istio, an ALLOW rule with HTTP fields never matches, a DENY rule applies
    /// as if they were absent.
    AsTcp,
    /// An HTTP or gRPC port before its first request: leave it to each request.
    Defer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Only requests can tell (an L7 port's connection, decided again per request).
    PerRequest,
}

/// A decision and what made it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    /// The policy whose rule decided, if one did.
    pub policy: Option<Arc<Policy>>,
    pub rule: Option<usize>,
    /// `allowed_by_policy`, `no_policy`, `denied_by_policy`, `no_allow_match`, `per_request`.
    pub reason: &'static str,
    /// AUDIT policies that matched.
    pub audited: Vec<Arc<Policy>>,
}

impl Decision {
    fn new(verdict: Verdict, reason: &'static str, by: Option<(&Arc<Policy>, usize)>) -> Self {
        Decision {
            verdict,
            policy: by.map(|(p, _)| p.clone()),
            rule: by.map(|(_, r)| r),
            reason,
            audited: Vec::new(),
        }
    }

    /// `ns/name` of the deciding policy, or `-`.
    pub fn policy_id(&self) -> String {
        self.policy.as_ref().map_or_else(|| "-".into(), |p| p.id())
    }
}

/// Policies of one namespace, split by how they select.
#[derive(Debug, Default)]
struct Namespace {
    /// No selector: every workload of the namespace.
    all: Vec<Arc<Policy>>,
    /// By one label of their selector (the first: key, then value); the rest is checked on
    /// lookup.
    by_label: HashMap<String, HashMap<String, Vec<Arc<Policy>>>>,
}

/// Every policy in force, indexed.
#[derive(Debug, Default)]
pub struct PolicySet {
    namespaces: HashMap<String, Namespace>,
    count: usize,
}

impl PolicySet {
    pub fn new(policies: Vec<Policy>) -> PolicySet {
        let mut set = PolicySet {
            count: policies.len(),
            ..Default::default()
        };
        for p in policies {
            let ns = set.namespaces.entry(p.namespace.clone()).or_default();
            let first = p.selector.as_ref().and_then(|s| s.iter().next());
            match first.map(|(k, v)| (k.clone(), v.clone())) {
                Some((k, v)) => {
                    (ns.by_label.entry(k).or_default().entry(v).or_default()).push(Arc::new(p))
                }
                None => ns.all.push(Arc::new(p)),
            }
        }
        set
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Every policy, by namespace and name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        let mut all: Vec<&Arc<Policy>> = (self.namespaces.values())
            .flat_map(|ns| {
                let selected = ns.by_label.values().flat_map(|v| v.values()).flatten();
                ns.all.iter().chain(selected)
            })
            .collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all.into_iter()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The policies that apply to `target`, mesh-wide first, each in file order.
    pub fn applicable(&self, target: &Target) -> Vec<&Arc<Policy>> {
        let mut out = Vec::new();
        let own = (target.namespace != ROOT_NAMESPACE).then_some(target.namespace);
        let scopes = std::iter::once(ROOT_NAMESPACE).chain(own);
        for ns in scopes.filter_map(|n| self.namespaces.get(n)) {
            out.extend(ns.all.iter());
            for (k, v) in target.labels {
                if let Some(list) = ns.by_label.get(k).and_then(|values| values.get(v)) {
                    out.extend(list.iter().filter(|p| p.selects(target)));
                }
            }
        }
        out
    }

    /// Decides one connection (`attrs.http` absent) or request.
    pub fn decide(&self, target: &Target, attrs: &Attrs, unknown: Unknown) -> Decision {
        let applicable = self.applicable(target);
        let of = |action| applicable.iter().filter(move |p| p.action == action);
        let audited: Vec<Arc<Policy>> = of(Action::Audit)
            .filter(|p| matches!(p.matching_rule(attrs), Some((_, Tri::Yes))))
            .map(|p| (*p).clone())
            .collect();
        let mut decision = decide_in_order(of(Action::Deny), of(Action::Allow), attrs, unknown);
        decision.audited = audited;
        decision
    }
}

fn decide_in_order<'a>(
    deny: impl Iterator<Item = &'a &'a Arc<Policy>>,
    allow: impl Iterator<Item = &'a &'a Arc<Policy>>,
    attrs: &Attrs,
    unknown: Unknown,
) -> Decision {
    let mut deny_deferred = None;
    for p in deny {
        match p.matching_rule(attrs) {
            Some((r, Tri::Yes)) => {
                return Decision::new(Verdict::Deny, "denied_by_policy", Some((p, r)))
            }
            Some((r, _)) if unknown == Unknown::AsTcp => {
                return Decision::new(Verdict::Deny, "denied_by_policy", Some((p, r)))
            }
            Some((r, _)) => deny_deferred = deny_deferred.or(Some((*p, r))),
            None => {}
        }
    }
    let (mut any_allow, mut matched, mut allow_deferred) = (false, None, None);
    for p in allow {
        any_allow = true;
        match p.matching_rule(attrs) {
            Some((r, Tri::Yes)) => {
                matched = Some((*p, r));
                break;
            }
            Some((r, _)) if unknown == Unknown::Defer => {
                allow_deferred = allow_deferred.or(Some((*p, r)))
            }
            _ => {}
        }
    }
    // No ALLOW rule can match whatever the requests are: denied now, DENY rules aside.
    if any_allow && matched.is_none() && allow_deferred.is_none() {
        return Decision::new(Verdict::Deny, "no_allow_match", None);
    }
    match (deny_deferred, matched, allow_deferred) {
        (Some(by), _, _) | (None, None, Some(by)) => {
            Decision::new(Verdict::PerRequest, "per_request", Some(by))
        }
        (None, Some(by), _) => Decision::new(Verdict::Allow, "allowed_by_policy", Some(by)),
        (None, None, None) => Decision::new(Verdict::Allow, "no_policy", None),
    }
}

/// A SPIFFE ID in the form policies name principals: `spiffe://td/ns/x/sa/y` -> `td/ns/x/sa/y`.
pub fn principal_of(id: &crate::identity::SpiffeId) -> String {
    format!(
        "{}/ns/{}/sa/{}",
        id.trust_domain, id.namespace, id.service_account
    )
}

#[cfg(test)]
mod tests;
