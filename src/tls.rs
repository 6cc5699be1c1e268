//! TLS, both ways: terminating clients' TLS, and speaking TLS to backends.
//!
//! Client side: `load_server_certificates` reads the PEM pairs of
//! `[server.tls]` while the config is validated (so a bad or mismatched pair
//! fails the load or the reload like any other config error, with file, line
//! and field) into a [`CertStore`]. The TLS listener's `acceptor` is built
//! once; its certificate resolver asks a `PickCertificate` closure for each
//! handshake's certificate (the wiring in `app` picks it from the store of
//! the routing snapshot in use), so a reload swaps certificates with
//! everything else, and established connections keep the session they
//! negotiated.
//! SNI picks a certificate by the names in its subjectAltName (exact, then
//! one-label wildcard); no match, or no SNI, gets the first certificate.
//! TLS 1.2 and 1.3 only, rustls's default ciphers and key exchanges
//! (aws-lc-rs, X25519MLKEM768 preferred), ALPN `h2` and `http/1.1`.
//!
//! Backend side: a `tls = true` backend gets an [`UpstreamTls`] (a shared
//! `rustls::ClientConfig` per CA file, or the system's roots, plus its SNI
//! name). `connect` makes every backend connection: pooled ones, a
//! WebSocket tunnel's own, a health check's. The pool keys a TLS backend's
//! connections by `authority`, which carries the settings' id
//! (`{id}@host:port`), so a reload that changes a
//! backend's CA or name gets fresh connections rather than reusing ones
//! verified the old way. Backends are spoken to in HTTP/1.1 only.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::warn;

use crate::util::fs::read_capped;
use crate::util::socket::keep_alive;

/// ALPN protocol id of HTTP/2, offered to clients first.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1, offered to clients second and to backends.
const ALPN_HTTP11: &[u8] = b"http/1.1";

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// rustls's default provider, aws-lc-rs, named explicitly so that no other
/// crate's choice of process-wide default can change it.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())))
}

// ---- certificates served to clients ----------------------------------------

/// A problem with one certificate/key pair: which of the two files it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PairError {
    /// The certificate file (unreadable, bad PEM, unusable certificate).
    Cert(String),
    /// The key file (unreadable, no usable key, not the certificate's key).
    Key(String),
}

/// One certificate chain with its key, and the DNS names SNI can pick it by.
struct Served {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
}

/// The certificates of `[server.tls]`: the first is the default.
pub struct CertStore {
    served: Vec<Served>,
    /// Lower-case DNS name → index; the first certificate naming it wins.
    exact: HashMap<String, usize>,
    /// `*.example.com` as `example.com` → index.
    wildcard: HashMap<String, usize>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.served.iter().map(|s| &s.names)).finish()
    }
}

impl CertStore {
    /// The certificate for a ClientHello's SNI name.
    pub(crate) fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let index = server_name
            .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|name| {
                self.exact.get(&name).or_else(|| name.split_once('.').and_then(|(_, parent)| self.wildcard.get(parent)))
            })
            .copied()
            .unwrap_or(0);
        self.served.get(index).map(|s| Arc::clone(&s.key))
    }

    /// The DNS names of each certificate, in config order.
    pub(crate) fn names(&self) -> impl Iterator<Item = &[String]> {
        self.served.iter().map(|s| s.names.as_slice())
    }
}

/// Reads and checks `(cert, key)` PEM pairs, the default first. Fails with
/// the index of the pair and what is wrong with it.
pub(crate) fn load_server_certificates(pairs: &[(PathBuf, PathBuf)]) -> Result<CertStore, (usize, PairError)> {
    let mut store = CertStore { served: Vec::new(), exact: HashMap::new(), wildcard: HashMap::new() };
    for (i, (cert, key)) in pairs.iter().enumerate() {
        let served = load_pair(cert, key).map_err(|e| (i, e))?;
        if i > 0 && served.names.is_empty() {
            return Err((
                i,
                PairError::Cert(format!(
                    "{} names no DNS name in its subjectAltName, so SNI can never pick it (only the first certificate is served without a name match)",
                    cert.display()
                )),
            ));
        }
        for name in &served.names {
            match name.strip_prefix("*.") {
                Some(parent) => store.wildcard.entry(parent.to_string()).or_insert(i),
                None => store.exact.entry(name.clone()).or_insert(i),
            };
        }
        store.served.push(served);
    }
    Ok(store)
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Served, PairError> {
    let cert_pem =
        read_capped(cert_path).map_err(|e| PairError::Cert(format!("cannot read {}: {e}", cert_path.display())))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PairError::Cert(format!("{}: bad PEM: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(PairError::Cert(format!("{} holds no PEM CERTIFICATE block", cert_path.display())));
    }
    let key_pem =
        read_capped(key_path).map_err(|e| PairError::Key(format!("cannot read {}: {e}", key_path.display())))?;
    // Never echo key material: errors name the file only.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        PairError::Key(format!(
            "{} holds no usable private key (PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
            key_path.display()
        ))
    })?;
    let names = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| PairError::Cert(format!("{}: cannot parse the first certificate: {e}", cert_path.display())))?
        .valid_dns_names()
        .map(str::to_ascii_lowercase)
        .collect();
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => PairError::Key(format!(
            "the private key in {} does not belong to the certificate in {}",
            key_path.display(),
            cert_path.display()
        )),
        other => PairError::Key(format!("{}: unusable private key: {other}", key_path.display())),
    })?;
    Ok(Served { key: Arc::new(key), names })
}

/// Picks a handshake's certificate by SNI name (`None`: the client sent
/// none) from wherever the caller keeps the live ones.
pub(crate) type PickCertificate = Box<dyn Fn(Option<&str>) -> Option<Arc<CertifiedKey>> + Send + Sync>;

/// Asks `pick` for each handshake's certificate, so a reload changes the
/// certificates of new handshakes and nothing else.
struct Resolver {
    pick: PickCertificate,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.pick)(hello.server_name())
    }
}

/// The TLS listener's acceptor; `pick` supplies the live certificates.
pub(crate) fn acceptor(pick: PickCertificate) -> Result<TlsAcceptor, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { pick }));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Why a client's handshake failed, as a metric label.
pub(crate) fn handshake_failure_reason(e: &io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(E::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => "not_tls",
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. }) => {
            "protocol"
        }
        Some(E::PeerMisbehaved(_) | E::DecryptError) => "protocol",
        Some(E::PeerIncompatible(_) | E::NoApplicationProtocol) => "incompatible",
        Some(E::AlertReceived(_)) => "alert",
        Some(_) => "other",
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "closed",
            _ => "other",
        },
    }
}

/// Every reason [`handshake_failure_reason`] gives, and `timeout`.
pub(crate) const HANDSHAKE_FAILURE_REASONS: [&str; 7] =
    ["timeout", "closed", "not_tls", "protocol", "incompatible", "alert", "other"];

// ---- TLS to backends --------------------------------------------------------

/// How to speak TLS to one backend.
#[derive(Clone)]
pub struct UpstreamTls {
    /// The rustls client config, shared by backends trusting the same CA.
    pub(crate) client: Arc<ClientConfig>,
    /// Sent as SNI and verified against the backend's certificate.
    pub server_name: ServerName<'static>,
    /// The CA file trusted (`None`: the system's roots).
    pub(crate) ca: Option<PathBuf>,
    /// Hash of the server name and the trusted CA file's content: equal
    /// ids verify equally, so their connections may be pooled together.
    pub(crate) id: u64,
}

impl UpstreamTls {
    /// Settings for `server_name`, trusting what `client` trusts (`ca`).
    pub(crate) fn new(
        client: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        ca: Option<PathBuf>,
        ca_hash: u64,
    ) -> Self {
        let mut h = DefaultHasher::new();
        (ca_hash, server_name.to_str()).hash(&mut h);
        UpstreamTls { client, server_name, ca, id: h.finish() }
    }
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls").field("server_name", &self.server_name).field("ca", &self.ca).finish()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.server_name == other.server_name && self.ca == other.ca
    }
}

/// The authority of requests to a backend: its address, with the TLS
/// settings' id as user info for a TLS backend (see the module doc).
pub(crate) fn authority<'a>(address: &'a str, tls: Option<&UpstreamTls>) -> Cow<'a, str> {
    match tls {
        None => Cow::Borrowed(address),
        Some(tls) => Cow::Owned(format!("{:016x}@{address}", tls.id)),
    }
}

impl Eq for UpstreamTls {}

/// Builds client configs while one config file is validated: backends
/// trusting the same CA share one (and with it the session cache).
#[derive(Default)]
pub(crate) struct ClientConfigs {
    by_ca: HashMap<Option<PathBuf>, (Arc<ClientConfig>, u64)>,
}

impl ClientConfigs {
    /// The client config trusting `ca` (a PEM file of one or more CA
    /// certificates), or the system's roots; and a hash of what it trusts.
    pub(crate) fn get(&mut self, ca: Option<&Path>) -> Result<(Arc<ClientConfig>, u64), String> {
        let key = ca.map(Path::to_path_buf);
        if let Some((config, hash)) = self.by_ca.get(&key) {
            return Ok((Arc::clone(config), *hash));
        }
        let (roots, hash) = match ca {
            Some(path) => {
                let (roots, hash) = roots_from_file(path)?;
                (Arc::new(roots), hash)
            }
            None => (system_roots()?, 0),
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        let config = Arc::new(config);
        self.by_ca.insert(key, (Arc::clone(&config), hash));
        Ok((config, hash))
    }
}

fn roots_from_file(path: &Path) -> Result<(RootCertStore, u64), String> {
    let pem = read_capped(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut h = DefaultHasher::new();
    pem.hash(&mut h);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no PEM CERTIFICATE block", path.display()));
    }
    Ok((roots, h.finish()))
}

/// The system's trust store, read once per process (it is large, and it
/// doesn't change under a running proxy often enough to re-read per reload).
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found.errors.first().map_or_else(String::new, |e| format!(" ({e})"));
                return Err(format!("no usable CA certificates in the system's trust store{why}; set tls_ca"));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// A connection to a backend: plain TCP or TLS over TCP.
#[allow(clippy::large_enum_variant)] // one per connection; boxing would add a pointer chase per read
pub enum UpstreamStream {
    /// A backend without `tls = true`.
    Plain(TcpStream),
    /// A `tls = true` backend, handshake done.
    Tls(tokio_rustls::client::TlsStream<TcpStream>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, data),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Wraps `tcp` in TLS for a backend, within `timeout`. A handshake that
/// fails is logged here, where the reason is known, and returned as an
/// `io::Error` carrying the `rustls::Error`.
async fn handshake(tcp: TcpStream, tls: &UpstreamTls, address: &str, timeout: Duration) -> io::Result<UpstreamStream> {
    let connector = TlsConnector::from(Arc::clone(&tls.client));
    match tokio::time::timeout(timeout, connector.connect(tls.server_name.clone(), tcp)).await {
        Ok(Ok(stream)) => Ok(UpstreamStream::Tls(stream)),
        Ok(Err(e)) => {
            warn!(address, server_name = ?tls.server_name, error = %e, "TLS handshake with backend failed");
            Err(e)
        }
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake with the backend timed out")),
    }
}

/// A new connection to a backend (for the pool, a WebSocket tunnel or a
/// health check): TCP within `timeout`, then TLS within another `timeout`
/// if the backend wants it.
pub(crate) async fn connect(address: &str, tls: Option<&UpstreamTls>, timeout: Duration) -> io::Result<UpstreamStream> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(connected) => connected?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    let _ = tcp.set_nodelay(true);
    keep_alive(&tcp);
    match tls {
        None => Ok(UpstreamStream::Plain(tcp)),
        Some(tls) => handshake(tcp, tls, address, timeout).await,
    }
}

/// Whether `e`, somewhere in its chain, is a TLS failure.
pub(crate) fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}
