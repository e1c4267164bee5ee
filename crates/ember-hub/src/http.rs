//! One HTTP request, no redirects followed: `http://` over a plain `TcpStream` (HTTP/1.1, one
//! connection per request), `https://` through ureq with the `https` feature. The Hub logic
//! (which redirects to follow, which headers to read) lives in `download.rs`, the same for both.

use crate::error::{HubError, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A response: status, headers and a body reader that fails (rather than ends early) when the
/// connection drops before the announced `Content-Length`.
pub(crate) struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase (`Not Found`).
    pub reason: String,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Box<dyn Read>,
}

impl Response {
    /// The first header of this name (HTTP names are case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request and returns the response head, without following redirects.
pub(crate) fn request(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<Response> {
    if let Some(rest) = url.strip_prefix("http://") {
        plain(method, url, rest, headers, timeout)
    } else if url.starts_with("https://") {
        tls(method, url, headers, timeout)
    } else {
        Err(HubError::BadResponse {
            url: url.to_owned(),
            message: "only http:// and https:// URLs can be fetched".into(),
        })
    }
}

#[cfg(feature = "https")]
fn tls(method: &str, url: &str, headers: &[(&str, String)], timeout: Duration) -> Result<Response> {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(timeout)
        .timeout_read(timeout)
        .build();
    let mut req = agent.request(method, url);
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let resp = match req.call() {
        Ok(r) => r,
        // ureq reports 4xx / 5xx as errors; the Hub logic reads their headers itself.
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => {
            return Err(HubError::Connection {
                url: url.to_owned(),
                message: t.to_string(),
            })
        }
    };
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_owned())))
        .collect();
    Ok(Response {
        status: resp.status(),
        reason: resp.status_text().to_owned(),
        headers,
        body: Box::new(resp.into_reader()),
    })
}

#[cfg(not(feature = "https"))]
fn tls(_: &str, url: &str, _: &[(&str, String)], _: Duration) -> Result<Response> {
    Err(HubError::TlsUnavailable {
        url: url.to_owned(),
    })
}

/// `http://host[:port]/path` over a plain connection.
fn plain(
    method: &str,
    url: &str,
    rest: &str,
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<Response> {
    let connection = |message: String| HubError::Connection {
        url: url.to_owned(),
        message,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(HubError::BadResponse {
            url: url.to_owned(),
            message: "the URL has no host (or has credentials, which are not supported)".into(),
        });
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'))
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addrs = with_port
        .to_socket_addrs()
        .map_err(|e| connection(format!("cannot resolve `{authority}`: {e}")))?;
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = stream
        .ok_or_else(|| connection(last.map_or_else(|| "no address".into(), |e| e.to_string())))?;
    let io = |e: std::io::Error| connection(e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    // One request per connection: `Connection: close` keeps the client free of pooling, and a
    // model has a handful of files.
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let (status, reason, headers) =
        read_head(&mut reader).map_err(|message| HubError::BadResponse {
            url: url.to_owned(),
            message,
        })?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    let body: Box<dyn Read> = if method == "HEAD" || status == 204 || status == 304 {
        Box::new(std::io::empty())
    } else if header("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        Box::new(Chunked::new(reader))
    } else if let Some(length) = header("Content-Length") {
        let length = length.parse::<u64>().map_err(|_| HubError::BadResponse {
            url: url.to_owned(),
            message: format!("Content-Length `{length}` is not a number"),
        })?;
        Box::new(Exact {
            inner: reader,
            remaining: length,
        })
    } else {
        // No length: the body ends when the server closes (`Connection: close`).
        Box::new(reader)
    };
    Ok(Response {
        status,
        reason,
        headers,
        body,
    })
}

/// A response's status code, reason phrase and headers (names as sent).
type Head = (u16, String, Vec<(String, String)>);

/// Reads the status line and headers.
fn read_head(reader: &mut impl BufRead) -> std::result::Result<Head, String> {
    let line = read_line(reader)?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: `{line}`"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("no status code in `{line}`"))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Ok((status, reason, headers));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header line `{line}`"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

/// One CRLF-terminated line, without the terminator; a closed connection is an error.
fn read_line(reader: &mut impl BufRead) -> std::result::Result<String, String> {
    let mut bytes = Vec::new();
    let n = reader
        .take(64 * 1024)
        .read_until(b'\n', &mut bytes)
        .map_err(|e| e.to_string())?;
    if n == 0 || bytes.last() != Some(&b'\n') {
        return Err("the connection closed inside the response head".into());
    }
    bytes.pop();
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|_| "a response header is not UTF-8".into())
}

/// A body of known length: an early end of the stream is an `UnexpectedEof` error, so that a
/// dropped connection can never look like a complete (short) file.
struct Exact<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the connection closed {} bytes before the end of the body",
                    self.remaining
                ),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A `Transfer-Encoding: chunked` body.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            done: false,
        }
    }
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let line = read_line(&mut self.inner)
                .map_err(|m| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, m))?;
            // A chunk size may carry `;extensions`.
            let size = line.split(';').next().unwrap_or_default().trim();
            self.left = u64::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size `{line}`")))?;
            if self.left == 0 {
                // Trailers, then the blank line that ends the body.
                while !read_line(&mut self.inner)
                    .map_err(|m| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, m))?
                    .is_empty()
                {}
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed inside a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let end = read_line(&mut self.inner)
                .map_err(|m| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, m))?;
            if !end.is_empty() {
                return Err(invalid("a chunk is not followed by CRLF".into()));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn chunked_bodies_decode_and_a_cut_one_fails() {
        let body = b"4\r\nWiki\r\n6;ext=1\r\npedia \r\n0\r\nTrailer: x\r\n\r\n";
        let mut out = String::new();
        Chunked::new(Cursor::new(&body[..]))
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "Wikipedia ");
        let cut = b"4\r\nWiki\r\n6\r\npe";
        let err = Chunked::new(Cursor::new(&cut[..]))
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_body_shorter_than_its_length_is_an_error() {
        let mut exact = Exact {
            inner: Cursor::new(b"abc".to_vec()),
            remaining: 5,
        };
        let err = exact.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let mut whole = Exact {
            inner: Cursor::new(b"abcdef".to_vec()),
            remaining: 5,
        };
        let mut out = Vec::new();
        whole.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcde");
    }

    #[test]
    fn response_heads_parse_and_garbage_is_rejected() {
        let mut ok = Cursor::new(
            b"HTTP/1.1 302 Found\r\nX-Repo-Commit: abc\r\nlocation: /x\r\n\r\n".to_vec(),
        );
        let (status, reason, headers) = read_head(&mut ok).unwrap();
        assert_eq!((status, reason.as_str()), (302, "Found"));
        assert_eq!(headers[1], ("location".into(), "/x".into()));
        let err = read_head(&mut Cursor::new(b"SSH-2.0-OpenSSH\r\n".to_vec())).unwrap_err();
        assert!(err.contains("SSH-2.0"), "{err}");
        let err = read_head(&mut Cursor::new(b"HTTP/1.1 200 OK\r\nX: y".to_vec())).unwrap_err();
        assert!(err.contains("closed"), "{err}");
    }
}
