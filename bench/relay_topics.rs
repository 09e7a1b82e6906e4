//! The cluster's relay layout measured against its alternative (docs/ARCHITECTURE.md "Why a
//! topic per node"): a topic per node (what imgw does: each node reads every partition of its
//! own topic) against one topic with a partition per node (each node reads its partition).
//! Both without consumer groups (assigned partitions, as imgw's ingress), on the broker of
//! `IMGW_KAFKA` (tests/services.sh's tansu by default).
//!
//! ```text
//! tests/services.sh start
//! cargo run --release --example relay_topics -- [NODES] [RECORDS_PER_S] [SECONDS] [PARTITIONS] [LAYOUT]
//! ```
//! Defaults: 3 nodes, 5,000 records/s, 10 s, 3 partitions per node topic (`kafka.partitions`),
//! both layouts (LAYOUT `node` or `partition` runs one). tansu's memory storage slows as
//! topics pile up, so compare layouts each on a freshly started broker (bench/relay_topics.sh).
//! One producer sends records of 200 bytes round robin to the nodes, keyed by recipient (1,000
//! recipients); one consumer thread per node. Prints per layout: records produced per second,
//! records consumed, and produce-to-consume latency p50 / p99 / max (ms), each layout on fresh
//! topics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Where node `i` reads: (topic, partitions).
fn layout(per_node: bool, run: &str, nodes: usize, partitions: i32) -> Vec<(String, Vec<i32>)> {
    (0..nodes)
        .map(|i| {
            if per_node {
                (
                    format!("imgw.bench.{run}.node{i}"),
                    (0..partitions).collect(),
                )
            } else {
                (format!("imgw.bench.{run}.nodes"), vec![i as i32])
            }
        })
        .collect()
}

fn create(brokers: &str, topics: &[(String, i32)]) -> Res<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for r in rt.block_on(admin.create_topics(new.iter(), &opts))? {
        if let Err((t, e)) = r {
            return Err(format!("create {t}: {e}").into());
        }
    }
    Ok(())
}

fn consumer(brokers: &str, topic: &str, parts: &[i32]) -> Res<BaseConsumer> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "imgw-bench-relay")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64 / 1e3
}

fn run_layout(
    per_node: bool,
    brokers: &str,
    nodes: usize,
    rate: u64,
    seconds: u64,
    partitions: i32,
) -> Res<()> {
    let run = format!("{}{}", std::process::id(), now_us() % 1_000_000);
    let reads = layout(per_node, &run, nodes, partitions);
    let mut topics: Vec<(String, i32)> = Vec::new();
    for (t, parts) in &reads {
        if !topics.iter().any(|(x, _)| x == t) {
            let n = if per_node {
                parts.len() as i32
            } else {
                nodes as i32
            };
            topics.push((t.clone(), n));
        }
    }
    create(brokers, &topics)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (topic, parts) in reads.clone() {
        let (brokers, stop) = (brokers.to_string(), stop.clone());
        threads.push(std::thread::spawn(move || -> Vec<u64> {
            let Ok(c) = consumer(&brokers, &topic, &parts) else {
                return Vec::new();
            };
            let mut lat = Vec::new();
            let mut quiet_since = Instant::now();
            loop {
                match c.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        quiet_since = Instant::now();
                        let sent = m
                            .payload()
                            .and_then(|p| p.get(..8))
                            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
                        lat.push(now_us().saturating_sub(sent));
                    }
                    _ => {
                        let idle = quiet_since.elapsed() > Duration::from_secs(3);
                        if stop.load(Ordering::Acquire) && idle {
                            return lat;
                        }
                    }
                }
            }
        }));
    }
    // Consumers assigned before the first record.
    std::thread::sleep(Duration::from_secs(2));
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let total = rate * seconds;
    let started = Instant::now();
    let mut payload = vec![0u8; 200];
    for k in 0..total {
        let due = Duration::from_micros(k * 1_000_000 / rate);
        while started.elapsed() < due {
            producer.poll(Duration::from_millis(0));
            std::thread::sleep(Duration::from_micros(200));
        }
        let node = (k as usize) % nodes;
        let key = format!("t/u{}", k % 1_000);
        payload[..8].copy_from_slice(&now_us().to_be_bytes());
        let (topic, parts) = &reads[node];
        let mut rec = BaseRecord::to(topic).key(&key).payload(&payload);
        if !per_node {
            rec = rec.partition(parts[0]);
        }
        if let Err((e, _)) = producer.send(rec) {
            return Err(format!("produce: {e}").into());
        }
    }
    let produced_s = started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(30))?;
    stop.store(true, Ordering::Release);
    let mut lat: Vec<u64> = Vec::new();
    for t in threads {
        lat.extend(t.join().unwrap_or_default());
    }
    lat.sort_unstable();
    println!(
        "| {} | {nodes} | {:.0} | {} of {total} | {:.2} | {:.2} | {:.2} |",
        if per_node {
            "topic per node"
        } else {
            "one topic, a partition per node"
        },
        total as f64 / produced_s,
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
    );
    Ok(())
}

fn main() -> Res<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<u64> = raw.iter().filter_map(|a| a.parse().ok()).collect();
    let only = raw.iter().find(|a| a.parse::<u64>().is_err()).cloned();
    let nodes = args.first().copied().unwrap_or(3) as usize;
    let rate = args.get(1).copied().unwrap_or(5_000);
    let seconds = args.get(2).copied().unwrap_or(10);
    let partitions = args.get(3).copied().unwrap_or(3) as i32;
    let brokers = std::env::var("IMGW_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    println!("| layout | nodes | produced/s | consumed | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for per_node in [true, false] {
        match (only.as_deref(), per_node) {
            (None, _) | (Some("node"), true) | (Some("partition"), false) => {
                run_layout(per_node, &brokers, nodes, rate, seconds, partitions)?
            }
            _ => {}
        }
    }
    Ok(())
}
