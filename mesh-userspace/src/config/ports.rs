//! Workload ports as the configuration names them: a number (plain TCP) or a number with the
//! protocol policy needs to know (`http`, `grpc`: each request is decided).

use serde::Deserialize;

/// A workload port, with its protocol when it is not plain TCP.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum PortConfig {
    Port(u16),
    Spec(PortSpec),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

impl PortConfig {
    pub fn port(&self) -> u16 {
        match self {
            PortConfig::Port(p) => *p,
            PortConfig::Spec(s) => s.port,
        }
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            PortConfig::Port(_) => Protocol::Tcp,
            PortConfig::Spec(s) => s.protocol,
        }
    }
}

/// What a workload port speaks, as far as policy needs to know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    /// HTTP/1.1: policy decides each request.
    Http,
    /// gRPC (HTTP/2 with prior knowledge): policy decides each call.
    Grpc,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Protocol, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "http" => Ok(Protocol::Http),
            "grpc" => Ok(Protocol::Grpc),
            other => Err(format!("{other:?} is not tcp, http or grpc")),
        }
    }
}
