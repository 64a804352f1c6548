//! Shared test helpers: a spool-file backend and a loopback server.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sipmail::smtp::{Backend, Envelope, MailParams, Reply, ServerConfig, SessionSummary, serve};
use tokio::net::TcpListener;

#[derive(Debug, Default)]
pub struct Store {
    pub messages: Vec<(Envelope, Vec<u8>)>,
    pub aborted: usize,
    pub summaries: Vec<SessionSummary>,
    pub mail_params: Vec<MailParams>,
}

pub type Shared = Arc<Mutex<Store>>;

/// Writes each message into a file in `dir`, fsyncs it on data_end and
/// records what was stored (read back from disk).
pub struct FileBackend {
    pub dir: PathBuf,
    pub store: Shared,
    current: Option<PathBuf>,
    n: usize,
}

impl FileBackend {
    pub fn new(dir: PathBuf, store: Shared) -> Self {
        FileBackend {
            dir,
            store,
            current: None,
            n: 0,
        }
    }
}

impl Backend for FileBackend {
    type Writer = tokio::fs::File;

    async fn mail_from(&mut self, from: &str, params: &MailParams) -> Result<(), Reply> {
        self.store.lock().unwrap().mail_params.push(params.clone());
        if from.contains("bad") {
            return Err(Reply::new(550, (5, 7, 1), "sender rejected"));
        }
        Ok(())
    }

    async fn rcpt_to(&mut self, to: &str) -> Result<(), Reply> {
        if to.ends_with("@denied.example") {
            Err(Reply::relay_denied("relay denied"))
        } else {
            Ok(())
        }
    }

    async fn data_start(&mut self, _envelope: &Envelope) -> Result<Self::Writer, Reply> {
        self.n += 1;
        let path = self.dir.join(format!("msg-{}-{}", self.n, next_id()));
        let f = tokio::fs::File::create(&path)
            .await
            .map_err(|_| Reply::temp_failure("cannot create spool file"))?;
        self.current = Some(path);
        Ok(f)
    }

    async fn data_end(&mut self, envelope: Envelope, writer: Self::Writer) -> Reply {
        if writer.sync_all().await.is_err() {
            return Reply::temp_failure("fsync failed");
        }
        drop(writer);
        let Some(path) = self.current.take() else {
            return Reply::temp_failure("no spool");
        };
        let bytes = tokio::fs::read(&path).await.unwrap_or_default();
        let mut st = self.store.lock().unwrap();
        st.messages.push((envelope, bytes));
        Reply::ok(format!("Ok: queued as Q{}", st.messages.len()))
    }

    async fn data_abort(&mut self, writer: Self::Writer) {
        drop(writer);
        if let Some(p) = self.current.take() {
            let _ = tokio::fs::remove_file(p).await;
        }
        self.store.lock().unwrap().aborted += 1;
    }
}

fn next_id() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn test_config() -> ServerConfig {
    ServerConfig {
        hostname: "mx.test".into(),
        max_message_size: 4 * 1024 * 1024,
        ..ServerConfig::default()
    }
}

/// Starts a loopback server accepting any number of sessions.
pub async fn start_server(cfg: ServerConfig) -> (SocketAddr, Shared, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store: Shared = Arc::default();
    let st = store.clone();
    let path = dir.path().to_path_buf();
    tokio::spawn(async move {
        loop {
            let Ok((sock, peer)) = listener.accept().await else {
                return;
            };
            sock.set_nodelay(true).unwrap();
            let st = st.clone();
            let cfg = cfg.clone();
            let path = path.clone();
            tokio::spawn(async move {
                let mut backend = FileBackend::new(path, st.clone());
                let res = serve(sock, peer.ip().to_string(), &cfg, &mut backend).await;
                if let Ok(summary) = res {
                    st.lock().unwrap().summaries.push(summary);
                }
            });
        }
    });
    (addr, store, dir)
}

/// Waits until `pred` holds for the store (sessions finish asynchronously).
pub async fn wait_for(store: &Shared, pred: impl Fn(&Store) -> bool) {
    for _ in 0..500 {
        if pred(&store.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached: {:?}", store.lock().unwrap());
}
