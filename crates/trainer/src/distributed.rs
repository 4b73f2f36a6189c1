//! Multi-host runs: which process this is, how many there are, and the key-value store they
//! share — what `jax.distributed.initialize(coordinator_address, num_processes, process_id)`
//! sets up.
//!
//! Process 0 serves a small key-value store over TCP at the coordinator address
//! ([`serve`]); every process (0 included) talks to it through a [`KvClient`]. The TPU and GPU
//! plugins exchange their topology through it while the PJRT client is created (the
//! `kv_get` / `kv_put` / `kv_try_get` callbacks of `PJRT_Client_Create`, see
//! [`pjrt::KeyValueStore`]); our own uses are the start-up rendezvous, which checks that every
//! process arrived with the same process count, and the barriers of sharded checkpoints.
//!
//! The protocol, one request and one reply per exchange on a persistent connection, all integers
//! little-endian:
//!
//! ```text
//! request:  op u8 (1 set, 2 get, 3 try_get) | key_len u32 | key | then
//!             set: value_len u32 | value        get: timeout_ms u64        try_get: nothing
//! reply:    status u8 (0 ok, 1 not found, 2 timed out, 3 error) | len u32 | value or message
//! ```
//!
//! Settings come from flags or environment variables, flags first:
//! `--coordinator-address` / `RATTN_COORDINATOR_ADDRESS` (host:port of process 0),
//! `--num-processes` / `RATTN_NUM_PROCESSES`, `--process-id` / `RATTN_PROCESS_ID`,
//! `--distributed-timeout` / `RATTN_DISTRIBUTED_TIMEOUT` (seconds, default 300).

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_TRY_GET: u8 = 3;
const ST_OK: u8 = 0;
const ST_NOT_FOUND: u8 = 1;
const ST_TIMEOUT: u8 = 2;
const ST_ERROR: u8 = 3;
/// Longest key or value the store accepts (a topology is a few kB; 64 MiB is generous).
const MAX_LEN: u32 = 64 << 20;

/// How this process takes part in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedConfig {
    /// `host:port` where process 0 serves the key-value store.
    pub coordinator_address: String,
    /// Number of processes.
    pub num_processes: usize,
    /// This process's index, `0..num_processes`.
    pub process_id: usize,
    /// How long to wait for the coordinator and for the other processes.
    pub timeout: Duration,
}

impl DistributedConfig {
    /// From flags, falling back to `RATTN_COORDINATOR_ADDRESS`, `RATTN_NUM_PROCESSES`,
    /// `RATTN_PROCESS_ID` and `RATTN_DISTRIBUTED_TIMEOUT`. `None` for a single-process run (no
    /// process count, or a count of 1). Errors name the missing or bad setting.
    pub fn from_flags_and_env(
        coordinator_address: Option<String>,
        num_processes: Option<usize>,
        process_id: Option<usize>,
        timeout_s: Option<f64>,
    ) -> Result<Option<DistributedConfig>> {
        fn env<T: std::str::FromStr>(name: &str) -> Result<Option<T>>
        where
            T::Err: std::fmt::Display,
        {
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|e| anyhow!("{name}={v:?}: {e}")),
                _ => Ok(None),
            }
        }
        let num = match num_processes {
            Some(n) => Some(n),
            None => env::<usize>("RATTN_NUM_PROCESSES")?,
        };
        let addr = match coordinator_address {
            Some(a) => Some(a),
            None => env::<String>("RATTN_COORDINATOR_ADDRESS")?,
        };
        let id = match process_id {
            Some(i) => Some(i),
            None => env::<usize>("RATTN_PROCESS_ID")?,
        };
        let timeout_s = match timeout_s {
            Some(t) => t,
            None => env::<f64>("RATTN_DISTRIBUTED_TIMEOUT")?.unwrap_or(300.0),
        };
        let Some(num) = num.filter(|&n| n > 1) else {
            if num == Some(0) {
                bail!("--num-processes must be at least 1");
            }
            // One process: its id can only be 0.
            if let Some(i) = id.filter(|&i| i > 0) {
                bail!(
                    "--process-id {i} is out of range for {} process (ids run from 0); a \
                     multi-process run passes --num-processes N on every host",
                    num.unwrap_or(1)
                );
            }
            return Ok(None);
        };
        let addr = addr.with_context(|| {
            format!(
                "{num} processes need a coordinator: pass --coordinator-address HOST:PORT (or set \
                 RATTN_COORDINATOR_ADDRESS), the address of process 0"
            )
        })?;
        let id = id.with_context(|| {
            "a multi-process run needs this process's index: pass --process-id N (or set \
             RATTN_PROCESS_ID)"
        })?;
        if id >= num {
            bail!("--process-id {id} is out of range for --num-processes {num}");
        }
        if !(timeout_s > 0.0 && timeout_s.is_finite()) {
            bail!("--distributed-timeout must be a positive number of seconds, got {timeout_s}");
        }
        Ok(Some(DistributedConfig {
            coordinator_address: addr,
            num_processes: num,
            process_id: id,
            timeout: Duration::from_secs_f64(timeout_s),
        }))
    }
}

/// The store's contents and the condition blocked `get`s wait on.
#[derive(Default)]
struct Table {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl Table {
    fn set(&self, key: String, value: Vec<u8>) {
        self.map.lock().expect("kv table").insert(key, value);
        self.changed.notify_all();
    }

    fn try_get(&self, key: &str) -> Option<Vec<u8>> {
        self.map.lock().expect("kv table").get(key).cloned()
    }

    fn get(&self, key: &str, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut map = self.map.lock().expect("kv table");
        loop {
            if let Some(v) = map.get(key) {
                return Some(v.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            map = self
                .changed
                .wait_timeout(map, deadline - now)
                .expect("kv table")
                .0;
        }
    }
}

/// The coordinator's server: serves the store until dropped (the listener thread then exits at
/// its next connection or when the process ends).
pub struct Server {
    addr: SocketAddr,
    _table: Arc<Table>,
}

impl Server {
    /// The address it listens on (the port is the real one when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serve the key-value store at `addr` (process 0). A thread per connection.
pub fn serve(addr: &str) -> Result<Server> {
    let listener = TcpListener::bind(addr).with_context(|| {
        format!("process 0 cannot serve the coordinator at {addr} (is the port in use?)")
    })?;
    let local = listener.local_addr()?;
    let table = Arc::new(Table::default());
    let t = table.clone();
    std::thread::Builder::new()
        .name("rattn-kv-listen".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let t = t.clone();
                let _ = std::thread::Builder::new()
                    .name("rattn-kv-conn".into())
                    .spawn(move || {
                        let _ = handle(conn, &t);
                    });
            }
        })?;
    Ok(Server {
        addr: local,
        _table: table,
    })
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_bytes(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let n = read_u32(r)?;
    if n > MAX_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("length {n} over the limit {MAX_LEN}"),
        ));
    }
    let mut v = vec![0u8; n as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn write_bytes(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    w.write_all(&(b.len() as u32).to_le_bytes())?;
    w.write_all(b)
}

fn handle(conn: TcpStream, table: &Table) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = BufWriter::new(conn);
    loop {
        let mut op = [0u8; 1];
        if r.read_exact(&mut op).is_err() {
            return Ok(()); // the client hung up
        }
        let key = String::from_utf8_lossy(&read_bytes(&mut r)?).into_owned();
        let (status, body) = match op[0] {
            OP_SET => {
                let v = read_bytes(&mut r)?;
                table.set(key, v);
                (ST_OK, Vec::new())
            }
            OP_GET => {
                let mut t = [0u8; 8];
                r.read_exact(&mut t)?;
                let timeout = Duration::from_millis(u64::from_le_bytes(t));
                match table.get(&key, timeout) {
                    Some(v) => (ST_OK, v),
                    None => (ST_TIMEOUT, Vec::new()),
                }
            }
            OP_TRY_GET => match table.try_get(&key) {
                Some(v) => (ST_OK, v),
                None => (ST_NOT_FOUND, Vec::new()),
            },
            other => (ST_ERROR, format!("unknown op {other}").into_bytes()),
        };
        w.write_all(&[status])?;
        write_bytes(&mut w, &body)?;
        w.flush()?;
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// `get` waited its whole timeout.
    Timeout {
        /// The key.
        key: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The connection or the server failed.
    Io(String),
}

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvError::Timeout { key, waited } => {
                write!(
                    f,
                    "key {key:?} did not appear within {:.1} s",
                    waited.as_secs_f64()
                )
            }
            KvError::Io(m) => write!(f, "key-value store: {m}"),
        }
    }
}

impl std::error::Error for KvError {}

/// The longest a request's answer may take past its own wait before the peer counts as silent.
const ANSWER_GRACE: Duration = Duration::from_secs(30);

/// A connection to the coordinator's store. Thread-safe: requests take turns on one connection.
pub struct KvClient {
    addr: String,
    /// How long past a request's own wait its answer may take: the connect timeout, at most
    /// [`ANSWER_GRACE`].
    grace: Duration,
    conn: Mutex<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
}

impl KvClient {
    /// Connect to the store at `addr`, retrying until `timeout` (the coordinator may start
    /// after us). The error says the coordinator is unreachable, with the last reason.
    pub fn connect(addr: &str, timeout: Duration) -> Result<KvClient> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        let mut pause = Duration::from_millis(20);
        loop {
            match addr.to_socket_addrs() {
                Ok(addrs) => {
                    for a in addrs {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(10))) {
                            Ok(s) => {
                                s.set_nodelay(true)?;
                                let r = BufReader::new(s.try_clone()?);
                                return Ok(KvClient {
                                    addr: addr.to_string(),
                                    grace: timeout.min(ANSWER_GRACE),
                                    conn: Mutex::new((r, BufWriter::new(s))),
                                });
                            }
                            Err(e) => last = format!("{a}: {e}"),
                        }
                    }
                }
                Err(e) => last = format!("cannot resolve: {e}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "cannot reach the coordinator at {addr} within {:.1} s ({last}); is process \
                     0 running, and is --coordinator-address its address?",
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// One request; the answer must come within `wait` plus the grace (a peer that
    /// accepts the connection but never answers, not a rattn coordinator, is an error, not a
    /// hang).
    fn request(
        &self,
        op: u8,
        key: &str,
        tail: &[u8],
        wait: Duration,
    ) -> std::result::Result<(u8, Vec<u8>), KvError> {
        let limit = wait.saturating_add(self.grace);
        let io = |e: std::io::Error| {
            let hint = match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                    "; no answer within {:.1} s: is it the coordinator (process 0) of this run?",
                    limit.as_secs_f64()
                ),
                std::io::ErrorKind::InvalidData => {
                    "; the peer does not speak the rattn store's protocol: is it the coordinator \
                     (process 0) of this run?"
                        .to_string()
                }
                std::io::ErrorKind::UnexpectedEof => {
                    "; the coordinator closed the connection".to_string()
                }
                _ => String::new(),
            };
            KvError::Io(format!("{} ({e}){hint}", self.addr))
        };
        let mut c = self
            .conn
            .lock()
            .map_err(|_| KvError::Io("poisoned".into()))?;
        let (r, w) = &mut *c;
        r.get_ref().set_read_timeout(Some(limit)).map_err(io)?;
        w.write_all(&[op]).map_err(io)?;
        write_bytes(w, key.as_bytes()).map_err(io)?;
        w.write_all(tail).map_err(io)?;
        w.flush().map_err(io)?;
        let mut st = [0u8; 1];
        r.read_exact(&mut st).map_err(io)?;
        let body = read_bytes(r).map_err(io)?;
        Ok((st[0], body))
    }

    /// Set `key` to `value` (overwriting).
    pub fn set(&self, key: &str, value: &[u8]) -> std::result::Result<(), KvError> {
        let mut tail = Vec::with_capacity(4 + value.len());
        write_bytes(&mut tail, value).expect("write to a Vec");
        match self.request(OP_SET, key, &tail, Duration::ZERO)? {
            (ST_OK, _) => Ok(()),
            (_, m) => Err(KvError::Io(String::from_utf8_lossy(&m).into_owned())),
        }
    }

    /// The value of `key`, waiting up to `timeout` for some process to set it.
    pub fn get(&self, key: &str, timeout: Duration) -> std::result::Result<Vec<u8>, KvError> {
        let ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        match self.request(OP_GET, key, &ms.to_le_bytes(), timeout)? {
            (ST_OK, v) => Ok(v),
            (ST_TIMEOUT, _) => Err(KvError::Timeout {
                key: key.to_string(),
                waited: timeout,
            }),
            (_, m) => Err(KvError::Io(String::from_utf8_lossy(&m).into_owned())),
        }
    }

    /// The value of `key` if set, without waiting.
    pub fn try_get(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, KvError> {
        match self.request(OP_TRY_GET, key, &[], Duration::ZERO)? {
            (ST_OK, v) => Ok(Some(v)),
            (ST_NOT_FOUND, _) => Ok(None),
            (_, m) => Err(KvError::Io(String::from_utf8_lossy(&m).into_owned())),
        }
    }
}

/// The store as the PJRT plugins see it: keys under `pjrt/`, so theirs and ours never collide.
struct PluginStore(Arc<KvClient>);

impl pjrt::KeyValueStore for PluginStore {
    fn get(&self, key: &str, timeout: Duration) -> std::result::Result<Vec<u8>, pjrt::KvError> {
        self.0
            .get(&format!("pjrt/{key}"), timeout)
            .map_err(plugin_error)
    }

    fn try_get(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, pjrt::KvError> {
        self.0.try_get(&format!("pjrt/{key}")).map_err(plugin_error)
    }

    fn put(&self, key: &str, value: &[u8]) -> std::result::Result<(), pjrt::KvError> {
        self.0
            .set(&format!("pjrt/{key}"), value)
            .map_err(plugin_error)
    }
}

fn plugin_error(e: KvError) -> pjrt::KvError {
    let code = match &e {
        KvError::Timeout { .. } => pjrt::ErrorCode::DeadlineExceeded,
        KvError::Io(_) => pjrt::ErrorCode::Unavailable,
    };
    pjrt::KvError {
        code,
        message: e.to_string(),
    }
}

/// This process's part in a multi-process run, after the rendezvous.
pub struct Distributed {
    /// This process's index.
    pub process_id: usize,
    /// Number of processes.
    pub num_processes: usize,
    /// The coordinator's address.
    pub coordinator_address: String,
    /// How long waits for other processes last.
    pub timeout: Duration,
    kv: Arc<KvClient>,
    _server: Option<Server>,
}

impl Distributed {
    /// Start (process 0: serve the store first), connect, and wait until every process has
    /// arrived with the same process count. Errors: an unreachable coordinator, a process that
    /// does not arrive within the timeout (naming the ones that did), a disagreeing count.
    pub fn initialize(cfg: &DistributedConfig) -> Result<Distributed> {
        let server = if cfg.process_id == 0 {
            Some(serve(&cfg.coordinator_address)?)
        } else {
            None
        };
        let addr = match &server {
            // Process 0 talks to its own server over loopback (the address may be 0.0.0.0).
            Some(s) => format!("127.0.0.1:{}", s.local_addr().port()),
            None => cfg.coordinator_address.clone(),
        };
        let kv = Arc::new(KvClient::connect(&addr, cfg.timeout)?);
        let me = format!(
            "{} {} {}",
            cfg.num_processes,
            std::process::id(),
            std::env::var("HOSTNAME").unwrap_or_default()
        );
        kv.set(&format!("rendezvous/{}", cfg.process_id), me.as_bytes())?;
        let start = Instant::now();
        let mut arrived = Vec::new();
        for q in 0..cfg.num_processes {
            let left = cfg.timeout.saturating_sub(start.elapsed());
            match kv.get(&format!("rendezvous/{q}"), left) {
                Ok(v) => {
                    let text = String::from_utf8_lossy(&v).into_owned();
                    let n: usize = text
                        .split(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    if n != cfg.num_processes {
                        bail!(
                            "process {q} was started with --num-processes {n}, this one (process \
                             {}) with {}",
                            cfg.process_id,
                            cfg.num_processes
                        );
                    }
                    arrived.push(q);
                }
                Err(KvError::Timeout { .. }) => {
                    let missing: Vec<usize> = (q..cfg.num_processes)
                        .filter(|r| {
                            kv.try_get(&format!("rendezvous/{r}"))
                                .ok()
                                .flatten()
                                .is_none()
                        })
                        .collect();
                    bail!(
                        "timed out after {:.1} s waiting for processes {missing:?} of {} at the \
                         coordinator {} (arrived: {arrived:?}); start the same command on every \
                         host with its own --process-id",
                        cfg.timeout.as_secs_f64(),
                        cfg.num_processes,
                        cfg.coordinator_address
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Distributed {
            process_id: cfg.process_id,
            num_processes: cfg.num_processes,
            coordinator_address: cfg.coordinator_address.clone(),
            timeout: cfg.timeout,
            kv,
            _server: server,
        })
    }

    /// The store as the PJRT plugins' key-value callbacks see it.
    pub fn plugin_store(&self) -> Arc<dyn pjrt::KeyValueStore> {
        Arc::new(PluginStore(self.kv.clone()))
    }

    /// Wait until every process has reached the barrier `name` (each name used once per run).
    pub fn barrier(&self, name: &str) -> Result<()> {
        self.kv
            .set(&format!("barrier/{name}/{}", self.process_id), b"1")?;
        let start = Instant::now();
        for q in 0..self.num_processes {
            let left = self.timeout.saturating_sub(start.elapsed());
            self.kv
                .get(&format!("barrier/{name}/{q}"), left)
                .map_err(|e| anyhow!("barrier {name:?}: process {q} did not arrive: {e}"))?;
        }
        Ok(())
    }
}

static GLOBAL: OnceLock<Distributed> = OnceLock::new();

/// Join the run described by `cfg` (once per process, before any client is made), like
/// `jax.distributed.initialize`. Later [`global`] returns it.
pub fn initialize(cfg: &DistributedConfig) -> Result<&'static Distributed> {
    let d = Distributed::initialize(cfg)?;
    GLOBAL
        .set(d)
        .map_err(|_| anyhow!("the distributed run was already initialized"))?;
    Ok(GLOBAL.get().expect("just set"))
}

/// The multi-process run this process joined, if any.
pub fn global() -> Option<&'static Distributed> {
    GLOBAL.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_try_get_and_a_blocking_get_over_loopback() {
        let server = serve("127.0.0.1:0").unwrap();
        let addr = server.local_addr().to_string();
        let a = KvClient::connect(&addr, Duration::from_secs(5)).unwrap();
        let b = KvClient::connect(&addr, Duration::from_secs(5)).unwrap();
        assert_eq!(a.try_get("k").unwrap(), None);
        a.set("k", b"v1").unwrap();
        assert_eq!(b.try_get("k").unwrap(), Some(b"v1".to_vec()));
        // A get blocks until another client sets the key.
        let addr2 = addr.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let c = KvClient::connect(&addr2, Duration::from_secs(5)).unwrap();
            c.set("late", &[0, 1, 2, 255]).unwrap();
        });
        let t0 = Instant::now();
        assert_eq!(
            b.get("late", Duration::from_secs(10)).unwrap(),
            vec![0, 1, 2, 255]
        );
        assert!(t0.elapsed() >= Duration::from_millis(150));
        setter.join().unwrap();
        // An empty value is a value.
        a.set("empty", b"").unwrap();
        assert_eq!(
            b.get("empty", Duration::from_secs(1)).unwrap(),
            Vec::<u8>::new()
        );
        let e = b.get("never", Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, KvError::Timeout { .. }), "{e}");
    }

    #[test]
    fn settings_from_flags_are_checked() {
        let from = |a: Option<&str>, n, i| {
            DistributedConfig::from_flags_and_env(a.map(String::from), n, i, Some(5.0))
        };
        assert_eq!(from(None, Some(1), None).unwrap(), None, "one process");
        assert_eq!(
            from(None, Some(1), Some(0)).unwrap(),
            None,
            "process 0 of 1"
        );
        let e = from(None, Some(1), Some(1)).unwrap_err().to_string();
        assert!(
            e.contains("--process-id 1 is out of range for 1 process"),
            "{e}"
        );
        let c = from(Some("10.0.0.1:8476"), Some(4), Some(3))
            .unwrap()
            .unwrap();
        assert_eq!((c.num_processes, c.process_id), (4, 3));
        assert_eq!(c.timeout, Duration::from_secs(5));
        let e = from(Some("h:1"), Some(2), Some(2)).unwrap_err().to_string();
        assert!(
            e.contains("--process-id 2 is out of range for --num-processes 2"),
            "{e}"
        );
        if std::env::var_os("RATTN_COORDINATOR_ADDRESS").is_none() {
            let e = from(None, Some(2), Some(0)).unwrap_err().to_string();
            assert!(e.contains("--coordinator-address HOST:PORT"), "{e}");
        }
        if std::env::var_os("RATTN_PROCESS_ID").is_none() {
            let e = from(Some("h:1"), Some(2), None).unwrap_err().to_string();
            assert!(e.contains("--process-id N"), "{e}");
        }
    }

    #[test]
    fn an_unreachable_coordinator_is_named() {
        // A port that was free a moment ago: nobody listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let e = KvClient::connect(&addr, Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("cannot reach the coordinator at {addr}")),
            "{e}"
        );
    }

    #[test]
    fn a_peer_that_never_answers_or_speaks_another_protocol_is_an_error_not_a_hang() {
        // Accepts, then stays silent.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let c = KvClient::connect(&addr, Duration::from_millis(500)).unwrap();
        let t = Instant::now();
        let e = c.set("k", b"v").unwrap_err().to_string();
        assert!(e.contains("no answer within 0.5 s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // Answers with HTTP.
        let http = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = http.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = http.accept().unwrap();
            let _ = s.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n");
            std::thread::sleep(Duration::from_millis(300));
        });
        let c = KvClient::connect(&addr, Duration::from_millis(500)).unwrap();
        let e = c.try_get("k").unwrap_err().to_string();
        assert!(
            e.contains("does not speak the rattn store's protocol"),
            "{e}"
        );
        h.join().unwrap();
    }
}
