//! Reading `AuthorizationPolicy` documents: multi-document YAML files, several files, or the
//! `.yaml`/`.yml` files of a directory (not recursing, skipping dot-files so a mounted
//! ConfigMap's `..data` links are read once). Everything meshd does not implement is an error
//! naming file, line and field rather than a silent ignore: unknown fields, `CUSTOM`,
//! `targetRef(s)`, JWT fields, dry-run.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{
    matcher::{Field, IpBlock, Pattern},
    rule::{Condition, Operation, Rule, Source},
    Action, Origin, Policy,
};

/// Why a policy file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

/// A YAML scalar that may be written as a string or a number (`ports: ["80"]` or `[80]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Str(String),
    Int(i64),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Str(s) => s.clone(),
            Scalar::Int(i) => i.to_string(),
        }
    }
}

type Values = Option<Vec<Scalar>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Doc {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Option<Spec>,
    /// What `kubectl get -o yaml` adds; never read.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    /// Accepted (Kubernetes objects carry them), not used.
    #[serde(default)]
    #[allow(dead_code)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    target_ref: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    target_refs: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    provider: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    rules: Option<Vec<RuleDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    #[serde(default)]
    from: Option<Vec<FromDoc>>,
    #[serde(default)]
    to: Option<Vec<ToDoc>>,
    #[serde(default)]
    when: Option<Vec<ConditionDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FromDoc {
    source: SourceDoc,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SourceDoc {
    principals: Values,
    not_principals: Values,
    request_principals: Values,
    not_request_principals: Values,
    namespaces: Values,
    not_namespaces: Values,
    ip_blocks: Values,
    not_ip_blocks: Values,
    remote_ip_blocks: Values,
    not_remote_ip_blocks: Values,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToDoc {
    operation: OperationDoc,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OperationDoc {
    hosts: Values,
    not_hosts: Values,
    ports: Values,
    not_ports: Values,
    methods: Values,
    not_methods: Values,
    paths: Values,
    not_paths: Values,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConditionDoc {
    key: String,
    #[serde(default)]
    values: Values,
    #[serde(default)]
    not_values: Values,
}

/// A semantic error inside one document: the field's path and why.
struct Bad {
    field: String,
    reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Bad {
    Bad {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Reads every policy under `paths` (files or directories). Two policies with one
/// `namespace/name` are an error, as they would be in Kubernetes.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Policy>, PolicyError> {
    let mut out = Vec::new();
    for path in paths {
        for file in files_of(path)? {
            let text = std::fs::read_to_string(&file).map_err(|e| PolicyError {
                file: file.clone(),
                line: None,
                message: format!("cannot read: {e}"),
            })?;
            out.extend(parse(&text, &file)?);
        }
    }
    let mut seen: HashMap<String, &Origin> = HashMap::new();
    for p in &out {
        if let Some(first) = seen.insert(p.id(), &p.origin) {
            return Err(PolicyError {
                file: p.origin.file.clone(),
                line: Some(p.origin.line),
                message: format!("policy {} is also defined at {first}", p.id()),
            });
        }
    }
    Ok(out)
}

/// The policy files of `path`: itself, or a directory's YAML files in name order.
pub fn files_of(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let fail = |e: std::io::Error| PolicyError {
        file: path.to_path_buf(),
        line: None,
        message: format!("cannot read: {e}"),
    };
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(fail)? {
        let p = entry.map_err(fail)?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && !p.is_dir() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses one file's documents.
pub fn parse(text: &str, file: &Path) -> Result<Vec<Policy>, PolicyError> {
    let mut out = Vec::new();
    for (start, chunk) in documents(text) {
        let fail = |line: usize, message: String| PolicyError {
            file: file.to_path_buf(),
            line: Some(line),
            message,
        };
        let yaml_error = |e: serde_yaml_ng::Error| {
            let line = e.location().map_or(0, |l| l.line() - 1);
            let text = e.to_string();
            // The position is given as a file line instead of the document's.
            let text = text.split(" at line ").next().unwrap_or(&text).to_string();
            fail(start + line, text)
        };
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&chunk).map_err(yaml_error)?;
        if value.is_null() {
            continue;
        }
        let doc: Doc = serde_yaml_ng::from_str(&chunk).map_err(yaml_error)?;
        let origin = Origin {
            file: file.to_path_buf(),
            line: start,
        };
        let policy =
            compile(doc, origin).map_err(|b| fail(start, format!("{}: {}", b.field, b.reason)))?;
        out.push(policy);
    }
    Ok(out)
}

/// Splits a multi-document stream at `---` lines: each document with the line it starts on
/// (1-based), so errors point into the file, not into the document.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let separator = line == "---" || line.starts_with("--- ") || line == "...";
        if separator {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs
}

fn compile(doc: Doc, origin: Origin) -> Result<Policy, Bad> {
    const VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
    if !VERSIONS.contains(&doc.api_version.as_str()) {
        return Err(bad(
            "apiVersion",
            format!("{:?} is not one of {VERSIONS:?}", doc.api_version),
        ));
    }
    if doc.kind != "AuthorizationPolicy" {
        return Err(bad(
            "kind",
            format!("{:?}: only AuthorizationPolicy is read here", doc.kind),
        ));
    }
    if doc.metadata.annotations.contains_key("istio.io/dry-run") {
        return Err(bad(
            "metadata.annotations.istio.io/dry-run",
            "dry-run policies are not supported",
        ));
    }
    let spec = doc.spec.unwrap_or_default();
    let unsupported = [
        ("spec.targetRef", spec.target_ref.is_some()),
        ("spec.targetRefs", spec.target_refs.is_some()),
        ("spec.provider", spec.provider.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(bad(
            *field,
            "not supported (select workloads with spec.selector.matchLabels)",
        ));
    }
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            return Err(bad(
                "spec.action",
                "CUSTOM (external authorization) is not supported",
            ))
        }
        Some(other) => {
            return Err(bad(
                "spec.action",
                format!("{other:?} is not ALLOW, DENY, AUDIT"),
            ))
        }
    };
    let rules = (spec.rules.unwrap_or_default().into_iter().enumerate())
        .map(|(i, r)| compile_rule(r, &format!("spec.rules[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(Policy {
        name: doc.metadata.name,
        namespace: doc.metadata.namespace.unwrap_or_else(|| "default".into()),
        action,
        selector: spec.selector.map(|s| s.match_labels),
        rules,
        origin,
    })
}

fn compile_rule(r: RuleDoc, at: &str) -> Result<Rule, Bad> {
    let from = (r.from.unwrap_or_default().into_iter().enumerate())
        .map(|(i, f)| compile_source(f.source, &format!("{at}.from[{i}].source")))
        .collect::<Result<_, _>>()?;
    let to = (r.to.unwrap_or_default().into_iter().enumerate())
        .map(|(i, t)| compile_operation(t.operation, &format!("{at}.to[{i}].operation")))
        .collect::<Result<_, _>>()?;
    let when = (r.when.unwrap_or_default().into_iter().enumerate())
        .map(|(i, c)| compile_condition(c, &format!("{at}.when[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(Rule { from, to, when })
}

/// Compiles `values`/`not_values` with `parse`, naming the field of a bad value.
fn field<T>(
    at: &str,
    names: (&str, &str),
    (values, not_values): (Values, Values),
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Field<T>, Bad> {
    let one = |name: &str, list: Values| -> Result<Vec<T>, Bad> {
        let list = list.unwrap_or_default();
        (list.iter().enumerate())
            .map(|(i, v)| parse(&v.text()).map_err(|e| bad(format!("{at}.{name}[{i}]"), e)))
            .collect()
    };
    Ok(Field {
        values: one(names.0, values)?,
        not_values: one(names.1, not_values)?,
    })
}

fn port(value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value:?} is not a port (1-65535)"))
}

fn compile_source(s: SourceDoc, at: &str) -> Result<Source, Bad> {
    let jwt = s.request_principals.is_some() || s.not_request_principals.is_some();
    if jwt {
        return Err(bad(
            format!("{at}.requestPrincipals"),
            "JWT request principals are not supported",
        ));
    }
    if s.remote_ip_blocks.is_some() || s.not_remote_ip_blocks.is_some() {
        return Err(bad(
            format!("{at}.remoteIpBlocks"),
            "not supported (meshd sees no X-Forwarded-For hops); use ipBlocks",
        ));
    }
    let source = Source {
        principals: field(
            at,
            ("principals", "notPrincipals"),
            (s.principals, s.not_principals),
            Pattern::parse,
        )?,
        namespaces: field(
            at,
            ("namespaces", "notNamespaces"),
            (s.namespaces, s.not_namespaces),
            Pattern::parse,
        )?,
        ip_blocks: field(
            at,
            ("ipBlocks", "notIpBlocks"),
            (s.ip_blocks, s.not_ip_blocks),
            IpBlock::parse,
        )?,
    };
    if source.principals.is_empty() && source.namespaces.is_empty() && source.ip_blocks.is_empty() {
        return Err(bad(
            at,
            "an empty source matches nothing Istio accepts: set at least one field",
        ));
    }
    Ok(source)
}

fn compile_operation(o: OperationDoc, at: &str) -> Result<Operation, Bad> {
    let host = |v: &str| Pattern::parse(v).map(Pattern::lowercase);
    let op = Operation {
        hosts: field(at, ("hosts", "notHosts"), (o.hosts, o.not_hosts), host)?,
        ports: field(at, ("ports", "notPorts"), (o.ports, o.not_ports), port)?,
        methods: field(
            at,
            ("methods", "notMethods"),
            (o.methods, o.not_methods),
            Pattern::parse,
        )?,
        paths: field(
            at,
            ("paths", "notPaths"),
            (o.paths, o.not_paths),
            path_pattern,
        )?,
    };
    let empty =
        op.hosts.is_empty() && op.ports.is_empty() && op.methods.is_empty() && op.paths.is_empty();
    if empty {
        return Err(bad(at, "an empty operation: set at least one field"));
    }
    Ok(op)
}

fn path_pattern(value: &str) -> Result<Pattern, String> {
    if value.contains('{') {
        return Err(format!(
            "{value:?}: path templates ({{*}}, {{**}}) are not supported"
        ));
    }
    Pattern::parse(value)
}

fn compile_condition(c: ConditionDoc, at: &str) -> Result<Condition, Bad> {
    if c.values.is_none() && c.not_values.is_none() {
        return Err(bad(at, "a condition needs values or notValues"));
    }
    let pair = (c.values, c.not_values);
    let names = ("values", "notValues");
    let key = c.key.as_str();
    Ok(match key {
        "source.ip" | "remote.ip" => Condition::SourceIp(field(at, names, pair, IpBlock::parse)?),
        "source.principal" => Condition::SourcePrincipal(field(at, names, pair, Pattern::parse)?),
        "source.namespace" => Condition::SourceNamespace(field(at, names, pair, Pattern::parse)?),
        "destination.ip" => Condition::DestinationIp(field(at, names, pair, IpBlock::parse)?),
        "destination.port" => Condition::DestinationPort(field(at, names, pair, port)?),
        _ => {
            let header = key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
                .ok_or_else(|| bad(format!("{at}.key"), format!("{key:?} is not supported (source.ip, remote.ip, source.principal, source.namespace, destination.ip, destination.port, request.headers[NAME])")))?;
            let name = http::HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes())
                .map_err(|_| {
                    bad(
                        format!("{at}.key"),
                        format!("{header:?} is not a header name"),
                    )
                })?;
            Condition::RequestHeader(name, field(at, names, pair, Pattern::parse)?)
        }
    })
}
