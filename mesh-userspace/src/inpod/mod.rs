//! Pods: workloads in their own network namespaces, served from inside them. The container
//! runtime's CNI chain calls `meshd-cni`, which tells meshd about each pod over a unix socket
//! (`protocol.rs`, `server.rs`); meshd (`manager.rs`) then makes the pod's listeners inside the
//! pod's namespace (`netns.rs`), has the interception mode capture the pod, and serves the pod
//! from its one event loop. The proxy stages get a [`crate::proxy::Scope`] naming the pod and
//! stay pod-agnostic otherwise.

pub mod cni;
pub mod cni_install;
pub mod manager;
pub mod metadata;
pub mod netns;
pub mod protocol;
pub mod server;
