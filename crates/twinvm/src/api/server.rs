//! The API server: the Unix socket and one thread per connection, each
//! handing its request to the [`router`](super::router).
//!
//! The socket is created with mode 0600: [`bind`] sets the umask to 0177
//! around `bind(2)`, so the socket file never exists with wider permissions
//! (a chmod after bind would leave a window; a private directory plus rename
//! would lengthen the path, which is limited to 107 bytes, and could leave
//! the directory behind). The umask is process-wide, so [`bind`] is meant to
//! run before other threads create files; `twinvm run` binds before the VM
//! and its threads exist.
//!
//! Every connection carries one request. A connection gets
//! [`REQUEST_TIMEOUT`] to deliver its whole request and [`WRITE_TIMEOUT`] to
//! take the response; at most [`MAX_CONNECTIONS`] are served at once, more
//! get 503 at once. So a client that sends garbage or stalls costs one
//! thread for a few seconds and never blocks the others.
//!
//! A long-running request (snapshot, migration) runs on its connection's
//! thread while other connections keep being served.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{self, Parsed, Request, Response};
use super::router::{Control, route};

/// How long a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at the same time.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest socket path, in bytes (`sun_path` holds 108 with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process listens on the socket.
    #[error("API socket '{}' is in use (is another twinvm running?)", .0.display())]
    InUse(PathBuf),
    /// The path does not fit in a socket address.
    #[error(
        "API socket path '{}' is too long: {len} bytes, at most {MAX_SOCKET_PATH} (use a shorter or relative path)",
        .path.display()
    )]
    PathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The path exists and is not a socket.
    #[error("API socket '{}' exists and is not a socket; not replacing it", .0.display())]
    NotASocket(PathBuf),
    /// The existing path could not be examined.
    #[error("cannot check the existing API socket '{}'", .path.display())]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove the stale API socket '{}'", .path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be created.
    #[error("cannot create API socket '{}'", .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server thread could not be started.
    #[error("cannot start the API server thread")]
    Spawn(#[source] std::io::Error),
}

/// A bound API socket, not yet served. Dropping it removes the socket file.
pub struct Listener {
    listener: UnixListener,
    socket: SocketFile,
}

/// Creates the API socket at `path` with mode 0600. A stale socket there
/// (nothing listening) is replaced; a live one, or a file of another kind,
/// is an error.
pub fn bind(path: &Path) -> Result<Listener, Error> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(Error::InUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                })?;
                tracing::info!(path = %path.display(), "replaced a stale API socket");
            }
            Err(source) => {
                return Err(Error::Probe {
                    path: path.to_path_buf(),
                    source,
                });
            }
        },
        Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Probe {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    let bind_err = |source| Error::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = bind_owner_only(path).map_err(bind_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    let socket = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    // The umask can only remove bits, so this holds unless the file system
    // ignores modes; then make sure anyway.
    if meta.permissions().mode() & 0o777 != 0o600 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    }
    Ok(Listener { listener, socket })
}

/// `UnixListener::bind` under umask 0177: the socket file is created with
/// mode 0600 (connecting needs write permission on it).
fn bind_owner_only(path: &Path) -> std::io::Result<UnixListener> {
    // Serializes concurrent binds, which would otherwise restore each
    // other's temporary umask.
    static UMASK: Mutex<()> = Mutex::new(());
    let _guard = lock(&UMASK);
    // SAFETY: umask only swaps the process's file mode creation mask; it
    // cannot fail and touches no memory.
    let old = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    result
}

impl Listener {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.socket.path
    }

    /// Serves API requests for `control` on a thread of its own until
    /// [`Server::stop`].
    pub fn serve(self, control: Arc<dyn Control>) -> Result<Server, Error> {
        let Listener { listener, socket } = self;
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            active: Mutex::new(0),
            idle: Condvar::new(),
        });
        let thread = {
            let listener = listener.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || accept_loop(&listener, &shared, &control))
                .map_err(Error::Spawn)?
        };
        Ok(Server {
            listener,
            shared,
            thread: Some(thread),
            socket: Some(socket),
        })
    }
}

/// The API socket file; removed on drop if it is still the one created
/// (not replaced meanwhile by someone else's).
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), "cannot remove the API socket: {e}");
        }
    }
}

/// State shared by the accept loop and the connection threads.
struct Shared {
    stopping: AtomicBool,
    active: Mutex<usize>,
    idle: Condvar,
}

/// A running API server.
pub struct Server {
    listener: Arc<UnixListener>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    socket: Option<SocketFile>,
}

impl Server {
    /// Stops accepting connections, gives requests in progress up to
    /// `grace` to finish, and removes the socket file.
    pub fn stop(mut self, grace: Duration) {
        self.shutdown(grace);
    }

    fn shutdown(&mut self, grace: Duration) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop: accept() on a socket shut down fails.
        // SAFETY: shutdown(2) on the listener's own fd, which stays open
        // (this holds a reference to it); touches no memory.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + grace;
        let mut active = lock(&self.shared.active);
        while *active > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("{} API requests still in progress at exit", *active);
                break;
            }
            active = self
                .shared
                .idle
                .wait_timeout(active, left)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        drop(active);
        self.socket = None;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown(Duration::ZERO);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>, control: &Arc<dyn Control>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        match accepted {
            Ok((stream, _)) => dispatch(stream, shared, control),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. out of file descriptors: wait a little instead of
                // spinning.
                tracing::warn!("API socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Hands `stream` to a connection thread, or answers 503 at once if
/// [`MAX_CONNECTIONS`] are being served.
fn dispatch(stream: UnixStream, shared: &Arc<Shared>, control: &Arc<dyn Control>) {
    {
        let mut active = lock(&shared.active);
        if *active >= MAX_CONNECTIONS {
            drop(active);
            refuse(stream, "too many API connections at once; try again");
            return;
        }
        *active += 1;
    }
    let guard = ActiveGuard(shared.clone());
    let control = control.clone();
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            let _guard = guard;
            serve_connection(stream, &*control);
        });
    // On failure the closure, and with it the stream (closing the
    // connection) and the guard, are dropped.
    if let Err(e) = spawned {
        tracing::warn!("API socket: cannot start a connection thread: {e}");
    }
}

/// Counts a connection thread as active until dropped.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        *lock(&self.0.active) -= 1;
        self.0.idle.notify_all();
    }
}

/// Answers 503 on a connection not served.
fn refuse(mut stream: UnixStream, message: &str) {
    // A fresh connection's send buffer is empty: this does not block long.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(&Response::error(503, message).to_bytes());
}

/// Reads one request, answers it and closes the connection.
fn serve_connection(mut stream: UnixStream, control: &dyn Control) {
    let response = match read_request(&mut stream, REQUEST_TIMEOUT) {
        Ok(req) => {
            let resp = route(control, &req);
            tracing::debug!(method = %req.method, path = %req.path, status = resp.status, "API request");
            resp
        }
        Err(ReadError::Http(e)) => {
            tracing::debug!("bad API request: {e}");
            e.response()
        }
        Err(ReadError::Gone) => return,
    };
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    if stream.write_all(&response.to_bytes()).is_ok() {
        finish(stream);
    }
}

/// Ends the response and drains (briefly, boundedly) whatever the client
/// still sends: closing a Unix socket with unread input makes the client's
/// read fail with ECONNRESET instead of seeing the response end.
fn finish(mut stream: UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    let mut left = 16;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => left -= 1,
        }
    }
}

/// Why no request could be read.
#[derive(Debug)]
enum ReadError {
    /// A bad, oversized, incomplete or late request: answer with an error.
    Http(http::HttpError),
    /// The client left before sending anything, or the connection broke.
    Gone,
}

/// Reads one request from `stream`, all of it within `timeout`.
fn read_request(stream: &mut UnixStream, timeout: Duration) -> Result<Request, ReadError> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut sent_continue = false;
    loop {
        match http::parse_request(&buf) {
            Ok(Parsed::Complete(req)) => return Ok(req),
            Ok(Parsed::Partial { awaits_continue }) => {
                if awaits_continue && !sent_continue {
                    sent_continue = true;
                    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
                    stream
                        .write_all(http::CONTINUE)
                        .map_err(|_| ReadError::Gone)?;
                }
            }
            Err(e) => return Err(ReadError::Http(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Http(http::HttpError::Timeout(timeout.as_secs())));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|_| ReadError::Gone)?;
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(ReadError::Gone),
            Ok(0) => return Err(ReadError::Http(http::HttpError::Truncated)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ReadError::Http(http::HttpError::Timeout(timeout.as_secs())));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(ReadError::Gone),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::router::fake::Fake;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "twinvm-unit-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("temp dir");
        dir
    }

    fn exchange(path: &Path, request: &[u8]) -> http::ClientResponse {
        let mut s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).expect("send");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("read");
        http::parse_response(&buf).expect("response")
    }

    #[test]
    fn serves_over_a_socket_and_cleans_up() {
        let dir = temp_dir("serve");
        let path = dir.join("api.sock");
        let listener = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second server on the same path is refused while this one lives.
        assert!(matches!(bind(&path), Err(Error::InUse(_))));

        let fake = Arc::new(Fake::default());
        let server = listener.serve(fake.clone()).expect("serve");
        let r = exchange(&path, &http::request_bytes("PUT", "/vm/pause", None));
        assert_eq!(r.status, 204);
        assert!(fake.is_paused());
        let r = exchange(&path, b"GARBAGE\r\n\r\n");
        assert_eq!(r.status, 400);
        let r = exchange(
            &path,
            b"PUT /vm/resume HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert_eq!(r.status, 204);
        assert!(!fake.is_paused());

        let started = Instant::now();
        server.stop(Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!path.exists(), "socket file left behind");
        assert!(UnixStream::connect(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_sockets_are_replaced_and_other_files_refused() {
        let dir = temp_dir("stale");
        let path = dir.join("api.sock");
        // A socket nobody listens on any more.
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let listener = bind(&path).expect("stale socket replaced");
        assert_eq!(listener.path(), path);
        drop(listener);
        assert!(!path.exists());

        std::fs::write(&path, "precious").unwrap();
        assert!(matches!(bind(&path), Err(Error::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");

        let long = dir.join("s".repeat(MAX_SOCKET_PATH));
        assert!(matches!(
            bind(&long),
            Err(Error::PathTooLong { len, .. }) if len > MAX_SOCKET_PATH
        ));

        let missing = dir.join("no/such/dir/api.sock");
        let err = bind(&missing).err().expect("missing directory");
        assert!(matches!(err, Error::Bind { .. }), "{err:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_replaced_socket_file_is_not_removed() {
        let dir = temp_dir("replaced");
        let path = dir.join("api.sock");
        let listener = bind(&path).expect("bind");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        drop(listener);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn read_request_times_out_and_notices_truncation() {
        let (mut server, mut client) = UnixStream::pair().expect("pair");
        client.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        let started = Instant::now();
        let err = read_request(&mut server, Duration::from_millis(300)).expect_err("stalls");
        assert!(
            matches!(err, ReadError::Http(http::HttpError::Timeout(_))),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));

        let (mut server, mut client) = UnixStream::pair().expect("pair");
        client.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        drop(client);
        let err = read_request(&mut server, Duration::from_secs(5)).expect_err("closed");
        assert!(
            matches!(err, ReadError::Http(http::HttpError::Truncated)),
            "{err:?}"
        );

        let (mut server, client) = UnixStream::pair().expect("pair");
        drop(client);
        let err = read_request(&mut server, Duration::from_secs(5)).expect_err("closed");
        assert!(matches!(err, ReadError::Gone), "{err:?}");
    }
}
