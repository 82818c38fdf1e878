//! What the end-to-end tests (and `benches/load.rs`) share: the real `ember serve` started on
//! a free loopback port with the demo model in fp32, helpers to talk to it over HTTP, and
//! deterministic prompts.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The demo model, also the name it is served under.
pub const MODEL: &str = "qwen3-moe-tiny";

/// Vocabulary ids below this are ordinary tokens of the demo model (the specials follow).
const ORDINARY_VOCAB: u32 = 1991;

/// `models/<name>` of the repository.
pub fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

/// The transformers references of the demo model (`models/<model>/reference.json`).
pub fn reference() -> Value {
    reference_of(MODEL)
}

/// The transformers references of `models/<name>`.
pub fn reference_of(name: &str) -> Value {
    let text = std::fs::read_to_string(model_dir(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A prompt of `len` ordinary token ids, the same for the same `seed`, different across seeds.
pub fn prompt(seed: u32, len: usize) -> Vec<u32> {
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (r >> 33) as u32 % ORDINARY_VOCAB
        })
        .collect()
}

/// A running server, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub http: reqwest::blocking::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `ember serve` with `extra` flags and waits until `/health` answers 200.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_model(MODEL, extra)
    }

    /// Starts `ember serve` on `models/<name>` with `extra` flags and waits until it is healthy.
    pub fn start_model(name: &str, extra: &[&str]) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["serve", "--model"])
            .arg(model_dir(name))
            .args([
                "--dtype",
                "float32",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ember serve");
        // Drain the log so the server never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = server.http.get(format!("{}/health", server.base)).send() {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "ember serve did not become healthy in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// POSTs `body` as JSON.
    pub fn send(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .unwrap()
    }

    /// POSTs `body` as JSON; the status and the JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.send(path, body);
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    /// POSTs `body` as JSON; the status and the answer as text (for plain-text answers).
    pub fn post_text(&self, path: &str, body: &Value) -> (u16, String) {
        let r = self.send(path, body);
        let status = r.status().as_u16();
        (status, r.text().unwrap())
    }

    /// A greedy completion of `prompt` (token ids) with exactly `max_tokens` tokens and their
    /// logprobs; panics unless it is answered with 200.
    pub fn complete(&self, prompt: &[u32], max_tokens: usize) -> Value {
        let (status, body) = self.post(
            "/v1/completions",
            &serde_json::json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0, "ignore_eos": true, "logprobs": 1}),
        );
        assert_eq!(status, 200, "{body}");
        body
    }

    /// GETs `path`; the status and the body text.
    pub fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    /// Opens a streamed POST; read its events with [`SseReader`].
    pub fn open_stream(&self, path: &str, body: &Value) -> SseReader {
        let r = self.send(path, body);
        assert_eq!(r.status().as_u16(), 200, "stream refused");
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        SseReader {
            lines: BufReader::new(r),
        }
    }

    /// A whole stream: its JSON chunks, checked to end with `data: [DONE]`.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let mut reader = self.open_stream(path, body);
        let mut chunks = Vec::new();
        loop {
            match reader.next_data().expect("the stream ended without [DONE]") {
                Data::Done => break,
                Data::Json(chunk) => chunks.push(chunk),
            }
        }
        assert!(reader.next_data().is_none(), "events after [DONE]");
        chunks
    }

    /// `/metrics` as `name{labels}` → value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200);
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// The value of the unlabelled sample `name` in `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        *self
            .metrics()
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in /metrics"))
    }

    /// The server's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Sends SIGTERM, as a process manager would.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

/// Runs `ember serve` on `models/<name>` with `extra` flags, expecting it to fail before it
/// serves; its error output. A server that starts instead is killed and the test fails.
pub fn serve_error(name: &str, extra: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["serve", "--model"])
        .arg(model_dir(name))
        .args(["--dtype", "float32", "--host", "127.0.0.1", "--port", "0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember serve");
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).ok();
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ember serve {extra:?} is still running after 60 s instead of failing");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = log.join().unwrap();
    assert!(
        !status.success(),
        "ember serve {extra:?} succeeded:\n{text}"
    );
    text
}

/// One event of a stream.
pub enum Data {
    Json(Value),
    Done,
}

/// Reads `data:` events off a streamed response.
pub struct SseReader {
    lines: BufReader<reqwest::blocking::Response>,
}

impl SseReader {
    /// The next event; `None` at the end of the body.
    pub fn next_data(&mut self) -> Option<Data> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.lines.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let Some(data) = line.trim_end().strip_prefix("data: ") else {
                continue;
            };
            return Some(if data == "[DONE]" {
                Data::Done
            } else {
                Data::Json(serde_json::from_str(data).unwrap())
            });
        }
    }
}
