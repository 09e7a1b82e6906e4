//! A tokio + tokio-tungstenite pub/sub server for the side-by-side benchmark: the plain-ws
//! protocol of bench/peers/README.md (text frames `{"op":"sub","topic":T}` and
//! `{"op":"pub","topic":T,"data":D}`; subscribers of T get D as one text frame).
//!
//! One thread (a current-thread runtime: the benchmark pins the server to one core), one task
//! reading and one task writing per connection, a 4 KiB WebSocket read buffer. The writer
//! drains everything queued for its connection before flushing, so deliveries due together
//! share a write.
//!
//! `tt-server [ADDR]` (default 127.0.0.1:8092).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The read buffer each connection gets (tungstenite's default is 128 KiB).
const READ_BUFFER: usize = 4 * 1024;
/// Largest message accepted.
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Deserialize)]
struct Request {
    op: String,
    topic: String,
    #[serde(default)]
    data: Option<String>,
}

type Outbox = mpsc::UnboundedSender<Message>;

#[derive(Default)]
struct Topics {
    next_id: u64,
    subs: HashMap<String, Vec<(u64, Outbox)>>,
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8092".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(&addr).await.expect("bind");
        eprintln!("tt-server listening on ws://{addr}");
        let topics = Rc::new(RefCell::new(Topics::default()));
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let topics = Rc::clone(&topics);
            tokio::task::spawn_local(async move {
                let _ = serve(sock, topics).await;
            });
        }
    });
}

async fn serve(sock: TcpStream, topics: Rc<RefCell<Topics>>) -> Result<(), String> {
    let _ = sock.set_nodelay(true);
    let cfg = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let ws = tokio_tungstenite::accept_async_with_config(sock, Some(cfg))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let id = {
        let mut t = topics.borrow_mut();
        t.next_id += 1;
        t.next_id
    };
    let writer = tokio::task::spawn_local(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut mine: Vec<String> = Vec::new();
    while let Some(msg) = stream.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let Ok(req) = serde_json::from_str::<Request>(text.as_str()) else {
            continue;
        };
        match req.op.as_str() {
            "sub" => {
                if !mine.contains(&req.topic) {
                    topics
                        .borrow_mut()
                        .subs
                        .entry(req.topic.clone())
                        .or_default()
                        .push((id, tx.clone()));
                    mine.push(req.topic);
                }
            }
            "pub" => {
                let data = Utf8Bytes::from(req.data.unwrap_or_default());
                let t = topics.borrow();
                if let Some(list) = t.subs.get(&req.topic) {
                    for (_, out) in list {
                        let _ = out.send(Message::Text(data.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    {
        let mut t = topics.borrow_mut();
        for topic in &mine {
            if let Some(list) = t.subs.get_mut(topic) {
                list.retain(|(i, _)| *i != id);
                if list.is_empty() {
                    t.subs.remove(topic);
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
    Ok(())
}
