//! Adds the Node service to the router. Until the node plugin lands, the driver refuses --node.

use super::driver::DriverOptions;
use crate::volume::controller::Controller;
use std::sync::Arc;
use tonic::transport::server::Router;

pub fn add_node(router: Router, opts: &DriverOptions, _controller: Arc<Controller>) -> anyhow::Result<Router> {
    anyhow::ensure!(!opts.node, "the node service is not built yet");
    Ok(router)
}
