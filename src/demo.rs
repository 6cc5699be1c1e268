//! TEMPORARY stub; replaced by branch `demo`.
use std::net::SocketAddr;
pub struct DemoInstance {
    name: String,
    addr: SocketAddr,
}
impl DemoInstance {
    pub async fn bind(name: impl Into<String>, addr: SocketAddr) -> std::io::Result<DemoInstance> {
        Ok(DemoInstance {
            name: name.into(),
            addr,
        })
    }
    pub fn spawn(
        name: impl Into<String>,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<DemoInstance> {
        Ok(DemoInstance {
            name: name.into(),
            addr: listener.local_addr()?,
        })
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn shutdown(&self) {}
}
impl DemoInstance {
    pub fn connected_devices(&self) -> usize {
        0
    }
}
