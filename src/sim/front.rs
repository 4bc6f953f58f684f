//! The HTTP side: reads requests off the socket (Content-Length bodies,
//! keep-alive), lets `handle` decide, writes the answer or plays a
//! connection fault on the real socket.

use super::{Action, FaultKind, HttpRequest, SimOptions, SimState};
use crate::serve::http::reason;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;

const PARTIAL: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+xml\r\nContent-Length: 5000\r\n\r\n<Parameters xmlns=\"http://hl7.org/fhir\"><parameter>";

fn read_request(r: &mut impl BufRead) -> std::io::Result<Option<HttpRequest>> {
    let mut first = String::new();
    loop {
        first.clear();
        if r.read_line(&mut first)? == 0 {
            return Ok(None);
        }
        if !first.trim().is_empty() {
            break;
        }
    }
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Content-Length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(super::MAX_BODY as usize)];
    r.read_exact(&mut body)?;
    Ok(Some(HttpRequest {
        method,
        path,
        headers,
        body,
    }))
}

pub(super) fn serve(client: TcpStream, state: &Mutex<SimState>, options: &SimOptions) {
    crate::lock(state).connections += 1;
    let _ = client.set_nodelay(true);
    let Ok(read_half) = client.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut client = client;
    while let Ok(Some(req)) = read_request(&mut reader) {
        let close = req
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("Connection") && v.eq_ignore_ascii_case("close"));
        {
            let mut st = crate::lock(state);
            st.in_flight += 1;
            st.max_in_flight = st.max_in_flight.max(st.in_flight);
        }
        if !options.latency.is_zero() {
            std::thread::sleep(options.latency);
        }
        let action = super::handle(state, options, &req);
        crate::lock(state).in_flight -= 1;
        match action {
            Action::Respond {
                status,
                content_type,
                body,
                retry_after,
                location,
            } => {
                let mut head = format!(
                    "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
                    reason(status),
                    body.len()
                );
                if let Some(secs) = retry_after {
                    head.push_str(&format!("Retry-After: {secs}\r\n"));
                }
                if let Some(location) = location {
                    head.push_str(&format!("Location: {location}\r\n"));
                }
                if close {
                    head.push_str("Connection: close\r\n");
                }
                head.push_str("\r\n");
                let mut out = head.into_bytes();
                out.extend_from_slice(&body);
                if client.write_all(&out).is_err() {
                    return;
                }
            }
            Action::Misbehave(kind) => {
                match kind {
                    FaultKind::ResetMidBody => {
                        let _ = client.write_all(PARTIAL);
                    }
                    FaultKind::Stall(d) => {
                        let _ = client.write_all(PARTIAL);
                        std::thread::sleep(d);
                    }
                    _ => {}
                }
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
        }
        if close {
            return;
        }
    }
}
