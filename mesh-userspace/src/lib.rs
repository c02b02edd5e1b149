//! meshd: a node-level transparent mTLS proxy. This library holds every stage of a connection's
//! path; `main.rs` is only the command line. See ARCHITECTURE.md for the path of one connection.

pub mod admin;
pub mod app;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod handover;
pub mod identity;
pub mod inpod;
pub mod intercept;
pub mod l7;
pub mod logbuf;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod sys;
pub mod tls;
pub mod tunnel;
