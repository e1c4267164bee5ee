//! A Hugging Face Hub on loopback for tests: serves `/{repo}/resolve/{revision}/{file}` from
//! local folders with the Hub's headers, so `from_pretrained("org/name")` is tested without a
//! network.
//!
//! What it answers, as huggingface.co does:
//! - a regular file: `200` with `ETag` (a 40-hex "git blob id"), `X-Repo-Commit`,
//!   `Content-Length`;
//! - an LFS file (`*.safetensors`, `*.bin`): `302` to an absolute `/cdn/<sha>` URL with
//!   `X-Linked-Etag` (a 64-hex "sha256"), `X-Linked-Size` and `X-Repo-Commit`; the bytes come
//!   from the CDN URL;
//! - an alias of a repository (a renamed one): `307` with a relative `Location`;
//! - errors with `X-Error-Code`: `RepoNotFound` (401, as the Hub answers an anonymous caller),
//!   `RevisionNotFound` (404), `EntryNotFound` (404, with `X-Repo-Commit`).
//!
//! The hashes are FNV digests of the content, not real SHA sums: clients only use them as
//! names. One connection at a time, `Connection: close`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One commit of a served repository.
#[derive(Debug, Clone)]
pub struct ServedRevision {
    /// The commit hash (40 hex digits).
    pub commit: String,
    /// Branch or tag names that point at it (`main`, `v1`).
    pub refs: Vec<String>,
    /// The folder whose files the commit holds.
    pub dir: PathBuf,
}

/// A served repository.
#[derive(Debug, Clone)]
pub struct ServedRepo {
    /// `org/name`.
    pub repo_id: String,
    /// Other ids that redirect here (a renamed repository).
    pub aliases: Vec<String>,
    /// Its commits.
    pub revisions: Vec<ServedRevision>,
}

#[derive(Default)]
struct State {
    repos: Vec<ServedRepo>,
    /// Files whose body is cut in the middle (the connection closed) on GET.
    drop_mid_body: HashSet<String>,
    /// `METHOD path` of every request, with ` auth=<value>` when one was sent.
    requests: Vec<String>,
}

/// The running server; stopped when dropped.
pub struct HubServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    handle: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Starts serving `repos` on `127.0.0.1` (a free port).
    pub fn start(repos: Vec<ServedRepo>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        let (s, st) = (stop.clone(), state.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        // A failed connection (the client gave up) must not stop the server.
                        let _ = handle(stream, addr, &st);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            state,
            handle: Some(handle),
        })
    }

    /// The endpoint to use as `HF_ENDPOINT`: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, a GET of `filename` sends the headers and half the body, then closes.
    pub fn drop_mid_body(&self, filename: &str) {
        lock(&self.state).drop_mid_body.insert(filename.to_owned());
    }

    /// The requests served so far: `METHOD path`, plus ` auth=<Authorization>` when sent.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state).requests.clone()
    }

    /// Stops the server and waits for its thread; the port refuses connections afterwards.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panicking test thread must not wedge the server for the others.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A digest of `bytes` as `len` hex digits (FNV-1a with a different seed per 16 digits).
pub fn fake_hash(bytes: &[u8], len: usize) -> String {
    let mut out = String::new();
    let mut seed = 0xcbf29ce484222325u64;
    while out.len() < len {
        let mut h = seed;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
        out.push_str(&format!("{h:016x}"));
        seed = seed.wrapping_add(0x9e3779b97f4a7c15);
    }
    out.truncate(len);
    out
}

fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".bin")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Reply {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only half the body, then close.
    cut: bool,
}

impl Reply {
    fn new(status: &'static str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut: false,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn error(status: &'static str, code: &str, message: &str) -> Self {
        Self::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
    }
}

fn handle(stream: TcpStream, addr: SocketAddr, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.trim().eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_owned());
            }
        }
    }
    let mut entry = format!("{method} {path}");
    if let Some(a) = &auth {
        entry.push_str(&format!(" auth={a}"));
    }
    lock(state).requests.push(entry);
    let reply = route(&method, &path, addr, state);
    write_reply(stream, &method, reply)
}

fn route(method: &str, path: &str, addr: SocketAddr, state: &Mutex<State>) -> Reply {
    let st = lock(state);
    if let Some(sha) = path.strip_prefix("/cdn/") {
        // The CDN: any served LFS file with this hash.
        for repo in &st.repos {
            for rev in &repo.revisions {
                let Ok(entries) = std::fs::read_dir(&rev.dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Ok(bytes) = std::fs::read(e.path()) {
                        if is_lfs(&name) && fake_hash(&bytes, 64) == sha {
                            let cut = method == "GET" && st.drop_mid_body.contains(&name);
                            let mut r = Reply::new("200 OK").header("ETag", format!("\"{sha}\""));
                            r.body = bytes;
                            r.cut = cut;
                            return r;
                        }
                    }
                }
            }
        }
        return Reply::new("404 Not Found");
    }
    let Some((repo_part, rest)) = path.split_once("/resolve/") else {
        return Reply::new("404 Not Found");
    };
    let repo_id = repo_part.trim_start_matches('/');
    let Some((rev_part, file_part)) = rest.split_once('/') else {
        return Reply::error("404 Not Found", "EntryNotFound", "Entry not found");
    };
    let revision = percent_decode(rev_part);
    let file = percent_decode(file_part);
    if let Some(repo) = st
        .repos
        .iter()
        .find(|r| r.aliases.iter().any(|a| a == repo_id))
    {
        return Reply::new("307 Temporary Redirect").header(
            "Location",
            format!("/{}/resolve/{rev_part}/{file_part}", repo.repo_id),
        );
    }
    let Some(repo) = st.repos.iter().find(|r| r.repo_id == repo_id) else {
        return Reply::error("401 Unauthorized", "RepoNotFound", "Repository not found");
    };
    let Some(rev) = repo
        .revisions
        .iter()
        .find(|r| r.commit == revision || r.refs.contains(&revision))
    else {
        return Reply::error("404 Not Found", "RevisionNotFound", "Invalid rev id");
    };
    let Ok(bytes) = std::fs::read(rev.dir.join(&file)) else {
        return Reply::error("404 Not Found", "EntryNotFound", "Entry not found")
            .header("X-Repo-Commit", rev.commit.clone());
    };
    if is_lfs(&file) {
        let sha = fake_hash(&bytes, 64);
        return Reply::new("302 Found")
            .header("X-Repo-Commit", rev.commit.clone())
            .header("X-Linked-Etag", format!("\"{sha}\""))
            .header("X-Linked-Size", bytes.len().to_string())
            .header("ETag", format!("\"{}\"", fake_hash(file.as_bytes(), 40)))
            .header("Location", format!("http://{addr}/cdn/{sha}"));
    }
    let cut = method == "GET" && st.drop_mid_body.contains(&file);
    let mut r = Reply::new("200 OK")
        .header("X-Repo-Commit", rev.commit.clone())
        .header("ETag", format!("\"{}\"", fake_hash(&bytes, 40)));
    r.body = bytes;
    r.cut = cut;
    r
}

fn write_reply(mut stream: TcpStream, method: &str, reply: Reply) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {}\r\nConnection: close\r\n", reply.status);
    for (n, v) in &reply.headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        let body = if reply.cut {
            &reply.body[..reply.body.len() / 2]
        } else {
            &reply.body[..]
        };
        stream.write_all(body)?;
    }
    stream.flush()?;
    // Drain what the client may still send so that closing does not reset the connection
    // before it read the reply.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = stream.read(&mut [0u8; 64]);
    Ok(())
}
