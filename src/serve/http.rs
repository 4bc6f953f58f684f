//! Just enough HTTP/1.1 for the local service: requests read with bounds
//! on every dimension (head size, body size, time to the first byte and to
//! the whole request), keep-alive, `Expect: 100-continue`, chunked bodies.
//! The head is parsed by `httparse` (hyper's parser); what is built on it
//! here is what the limits need. A client that stalls or floods is cut off
//! by a deadline, not by the next client waiting.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A connection, in the clear or inside TLS.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Stream {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Request line and headers, in bytes.
    pub head: usize,
    /// Body, in bytes (after de-chunking).
    pub body: usize,
    /// Time an open connection may wait for the first byte of a request
    /// (the TLS handshake included).
    pub idle: Duration,
    /// Time from a request's first byte to its last.
    pub request: Duration,
}

#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// Percent-decoded, without the query.
    pub path: String,
    /// Decoded name/value pairs, in order.
    pub query: Vec<(String, String)>,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the client keeps the connection open after the answer.
    pub keep_alive: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub(crate) fn query_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.query
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why no request could be read. None of them quotes what was received.
#[derive(Debug, PartialEq)]
pub(crate) enum ReadError {
    /// The client closed the connection, or sent nothing in time, between
    /// requests: nothing to answer.
    Closed,
    /// A request began but did not arrive in time (408).
    Timeout,
    /// Not HTTP/1.x as this server reads it (400).
    Malformed(&'static str),
    /// The request line and headers are too long (431).
    HeadTooLarge,
    /// The body is larger than the limit (413).
    BodyTooLarge,
    /// A transfer coding other than chunked (501).
    Unsupported(&'static str),
}

impl ReadError {
    pub fn status(&self) -> u16 {
        match self {
            ReadError::Closed => 400,
            ReadError::Timeout => 408,
            ReadError::Malformed(_) => 400,
            ReadError::HeadTooLarge => 431,
            ReadError::BodyTooLarge => 413,
            ReadError::Unsupported(_) => 501,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            ReadError::Closed => "connection closed".into(),
            ReadError::Timeout => "the request did not arrive in time".into(),
            ReadError::Malformed(why) => format!("malformed HTTP request: {why}"),
            ReadError::HeadTooLarge => "the request line and headers are too long".into(),
            ReadError::BodyTooLarge => "the request body is larger than the service accepts".into(),
            ReadError::Unsupported(why) => format!("not supported: {why}"),
        }
    }
}

const MAX_HEADERS: usize = 64;

/// A connection's reading side: bytes received but not yet used (the
/// start of a pipelined next request) stay in `buf`.
pub(crate) struct Conn {
    pub stream: Stream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more bytes before `deadline`; `Ok(0)` at the end of the stream.
    fn fill(&mut self, deadline: Instant) -> Result<usize, ReadError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Timeout);
        }
        // (A zero timeout would mean "none": `left` is at least 1 ns here.)
        if self.stream.tcp().set_read_timeout(Some(left)).is_err() {
            return Err(ReadError::Malformed("connection lost"));
        }
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(ReadError::Timeout)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(self.fill(deadline)?),
            // (A reset, or a TLS alert: the client is gone or not one.)
            Err(_) => Err(ReadError::Closed),
        }
    }

    /// The next request on the connection.
    pub(crate) fn read_request(&mut self, limits: &Limits) -> Result<Request, ReadError> {
        let idle_until = Instant::now() + limits.idle;
        let mut deadline = (!self.buf.is_empty()).then(|| Instant::now() + limits.request);
        let head_len = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end + 4;
            }
            if self.buf.len() > limits.head {
                return Err(ReadError::HeadTooLarge);
            }
            let waiting = deadline.is_none();
            match self.fill(deadline.unwrap_or(idle_until)) {
                Ok(0) if self.buf.is_empty() => return Err(ReadError::Closed),
                Ok(0) => return Err(ReadError::Malformed("connection closed within the request")),
                Ok(_) => {
                    if waiting {
                        deadline = Some(Instant::now() + limits.request);
                    }
                }
                Err(ReadError::Timeout) if waiting && self.buf.is_empty() => return Err(ReadError::Closed),
                Err(e) => return Err(e),
            }
        };
        if head_len > limits.head + 4 {
            return Err(ReadError::HeadTooLarge);
        }
        let deadline = deadline.unwrap_or_else(|| Instant::now() + limits.request);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&self.buf[..head_len]) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(ReadError::Malformed("incomplete head")),
            Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadTooLarge),
            Err(_) => return Err(ReadError::Malformed("not an HTTP/1.x request")),
        }
        let method = parsed.method.unwrap_or_default().to_string();
        let target = parsed.path.unwrap_or_default();
        let version = parsed.version.unwrap_or(1);
        let mut header_list = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let Ok(value) = std::str::from_utf8(h.value) else {
                return Err(ReadError::Malformed("a header value is not UTF-8"));
            };
            header_list.push((h.name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
        let path = percent_decode(raw_path, false).ok_or(ReadError::Malformed("bad percent-encoding in the path"))?;
        let query = parse_query(raw_query).ok_or(ReadError::Malformed("bad percent-encoding in the query"))?;
        self.buf.drain(..head_len);

        let mut request = Request {
            method,
            path,
            query,
            headers: header_list,
            body: Vec::new(),
            keep_alive: false,
        };
        let connection = request.header("connection").unwrap_or("").to_ascii_lowercase();
        request.keep_alive = if version == 0 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        let lengths: Vec<&str> = request
            .headers
            .iter()
            .filter(|(k, _)| k == "content-length")
            .map(|(_, v)| v.as_str())
            .collect();
        let chunked = match request.header("transfer-encoding") {
            None => false,
            Some(te) if te.eq_ignore_ascii_case("chunked") => true,
            Some(_) => return Err(ReadError::Unsupported("a transfer coding other than chunked")),
        };
        if chunked && !lengths.is_empty() {
            // (Both: the classic request-smuggling shape.)
            return Err(ReadError::Malformed("both Content-Length and Transfer-Encoding"));
        }
        let length = match lengths.as_slice() {
            [] => None,
            [one] => Some(
                one.parse::<u64>()
                    .map_err(|_| ReadError::Malformed("Content-Length is not a number"))?,
            ),
            _ => return Err(ReadError::Malformed("more than one Content-Length")),
        };
        if length.is_some_and(|n| n > limits.body as u64) {
            return Err(ReadError::BodyTooLarge);
        }
        let expects_continue = request
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue && (chunked || length.is_some_and(|n| n > 0)) && self.buf.is_empty() {
            let _ = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            let _ = self.stream.flush();
        }
        request.body = if chunked {
            self.read_chunked(limits.body, deadline)?
        } else {
            // (`length` is at most `limits.body`, a usize.)
            let n = length.unwrap_or(0) as usize;
            while self.buf.len() < n {
                if self.fill(deadline)? == 0 {
                    return Err(ReadError::Malformed("connection closed within the body"));
                }
            }
            self.buf.drain(..n).collect()
        };
        Ok(request)
    }

    fn read_chunked(&mut self, limit: usize, deadline: Instant) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let line = self.line(deadline)?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| ReadError::Malformed("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line(deadline)?.is_empty() {}
                return Ok(body);
            }
            if body.len().saturating_add(size) > limit {
                return Err(ReadError::BodyTooLarge);
            }
            while self.buf.len() < size + 2 {
                if self.fill(deadline)? == 0 {
                    return Err(ReadError::Malformed("connection closed within a chunk"));
                }
            }
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(ReadError::Malformed("a chunk does not end with CRLF"));
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }

    /// One CRLF-terminated line (at most 4 KiB), without the CRLF.
    fn line(&mut self, deadline: Instant) -> Result<String, ReadError> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8(self.buf[..end].to_vec())
                    .map_err(|_| ReadError::Malformed("a chunk line is not UTF-8"))?;
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                return Err(ReadError::Malformed("a chunk line is too long"));
            }
            if self.fill(deadline)? == 0 {
                return Err(ReadError::Malformed("connection closed within the chunks"));
            }
        }
    }

    /// Writes an answer (the body left out for HEAD).
    pub fn respond(&mut self, response: &Response, keep_alive: bool) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Length: {}\r\n",
            response.status,
            reason(response.status),
            response.body.len()
        );
        if !response.content_type.is_empty() {
            head.push_str(&format!("Content-Type: {}\r\n", response.content_type));
        }
        for (name, value) in &response.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        let mut out = head.into_bytes();
        out.extend_from_slice(&response.body);
        self.stream.write_all(&out)?;
        self.stream.flush()
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type: content_type.to_string(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

/// The reason phrase of a status (the local service's and the simulator's).
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `%XX` decoded (and `+` as a space, in a query); `None` if malformed or
/// not UTF-8.
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex(*bytes.get(i + 1)?)?;
                let lo = hex(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn parse_query(q: &str) -> Option<Vec<(String, String)>> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_reads_the_query_forms_clients_send() {
        assert_eq!(
            percent_decode("%24pseudonymize", false).as_deref(),
            Some("$pseudonymize")
        );
        assert_eq!(percent_decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%2", false), None);
        assert_eq!(percent_decode("%ff", false), None);
        assert_eq!(
            parse_query("domain=MII&original=1%2B2&original=3&flag"),
            Some(vec![
                ("domain".into(), "MII".into()),
                ("original".into(), "1+2".into()),
                ("original".into(), "3".into()),
                ("flag".into(), String::new()),
            ])
        );
    }
}
