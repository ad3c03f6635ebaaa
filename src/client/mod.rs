//! A CSI client for any endpoint (Unix socket or TCP): the `client` subcommand, the demo, the
//! integration tests and the bench all speak to the driver through this.

pub mod cli;

use crate::csi::proto::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};
use crate::csi::server::Endpoint;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

#[derive(Clone)]
pub struct CsiClient {
    pub channel: Channel,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl CsiClient {
    pub async fn connect(endpoint: &str) -> anyhow::Result<Self> {
        let channel = match Endpoint::parse(endpoint)? {
            Endpoint::Unix(path) => {
                TonicEndpoint::try_from("http://[::1]:1")?
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await?
            }
            Endpoint::Tcp(addr) => {
                TonicEndpoint::try_from(format!("http://{addr}"))?
                    .connect()
                    .await?
            }
        };
        Ok(Self {
            channel: channel.clone(),
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }

    /// Retries until the endpoint accepts connections, for freshly started drivers.
    pub async fn connect_with_retry(
        endpoint: &str,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match Self::connect(endpoint).await {
                Ok(c) => return Ok(c),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }
}
