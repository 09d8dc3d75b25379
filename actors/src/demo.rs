//! `gridweaver demo`: the whole controller on one machine with nothing else running.
//!
//! Starts an embedded MQTT broker on a free loopback port, the controller against it, a
//! seeded simulated fleet (some vehicles answer late, some never, some reject), then a
//! script of signals of every type and direction plus a few bad inputs. It prints a line
//! per settled dispatch and a summary, and leaves the event log in `--db`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use gridweaver_core::config::Config;
use gridweaver_core::model::DispatchOutcome;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::broker::start_embedded_broker;
use crate::controller::Controller;
use crate::sim::{generate_fleet, FleetMix, SimConfig, Simulator};

/// How long vehicles have to answer in the demo, seconds.
const ACK_TIMEOUT_S: f64 = 1.5;

/// The scripted signals: (type, direction, kW, duration s). Each window outlasts the ACK
/// deadline (a fallback runs only while its window is open) and the demo waits for it to end
/// before the next signal, so every signal finds the fleet free; power the gateway has
/// ordered stays committed until its window ends, and a signal overlapping it gets only
/// what is left.
const SCRIPT: &[(&str, &str, f64, u64)] = &[
    ("fcr", "up", 80.0, 2),
    ("fcr", "down", 60.0, 2),
    ("afrr", "up", 150.0, 2),
    ("afrr", "down", 120.0, 2),
    ("mfrr", "up", 250.0, 2),
    ("mfrr", "down", 200.0, 2),
    ("dr", "up", 100.0, 2),
    ("dr", "down", 90.0, 2),
    ("afrr", "up", 3000.0, 2),
    ("fcr", "up", 40.0, 2),
];

/// Runs the demo; `db` is replaced.
pub fn run(db: &Path, vehicles: usize, seed: u64) -> anyhow::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", db.display());
        if Path::new(&p).exists() {
            std::fs::remove_file(&p).with_context(|| format!("cannot replace {p}"))?;
        }
    }
    let started = Instant::now();
    let broker = start_embedded_broker().context("cannot start the embedded MQTT broker")?;
    println!(
        "GridWeaver Edge demo: embedded broker on 127.0.0.1:{}, {vehicles} simulated vehicles (seed {seed})",
        broker.port
    );
    let yaml = format!(
        "site: demo\nmqtt: {{ host: 127.0.0.1, port: {}, client_id: gridweaver-demo }}\nstore: {{ path: {:?} }}\n\
         dispatch: {{ ack_timeout_seconds: {ACK_TIMEOUT_S}, strategy: smart, fallback: balanced }}\n",
        broker.port,
        db.display().to_string()
    );
    let cfg = Config::from_yaml(&yaml).context("the demo's own config is invalid")?;
    let system = actix::System::new();
    let summary = system.block_on(script(cfg, vehicles, seed))?;
    println!("{summary}");
    println!("event log: {} (try: gridweaver events --db {} --kind DispatchCompleted)", db.display(), db.display());
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn script(cfg: Config, vehicles: usize, seed: u64) -> anyhow::Result<String> {
    let controller = Controller::start(&cfg)?;
    let prefix = cfg.mqtt.prefix.clone();
    let fleet = generate_fleet(seed, vehicles, FleetMix { late: 0.08, silent: 0.06, rejecting: 0.06 });
    let plugged = fleet.iter().filter(|v| v.plugged_in).count();
    let sim = Simulator::start(
        SimConfig {
            host: cfg.mqtt.host.clone(),
            port: cfg.mqtt.port,
            prefix: prefix.clone(),
            client_id: "demo-fleet".into(),
            prompt_ack_ms: (5, 120),
            late_ack_ms: (ACK_TIMEOUT_S * 1000.0) as u64 + 400,
            seed,
            soc_drift: true,
        },
        fleet,
    )?;

    // An observer: the operator's view of the gateway's outbound topics.
    let mut opts = MqttOptions::new("demo-operator", cfg.mqtt.host.clone(), cfg.mqtt.port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    for t in ["dispatches/+", "errors", "capacity"] {
        client.subscribe(format!("{prefix}/{t}"), QoS::AtLeastOnce).await?;
    }
    let (tx, mut rx) = mpsc::channel::<(String, Value)>(1024);
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send((p.topic.clone(), v)).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });

    print!("waiting for the fleet to be discovered ");
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((topic, v))) if topic.ends_with("/capacity") => {
                let n = v["vehicles"].as_u64().unwrap_or(0) as usize;
                if n > 0 && n + 4 >= plugged {
                    println!(
                        "- {n} vehicles eligible, {:.0} kW up / {:.0} kW down",
                        v["up_kw"].as_f64().unwrap_or(0.0),
                        v["down_kw"].as_f64().unwrap_or(0.0)
                    );
                    break;
                }
            }
            Ok(Some(_)) => {}
            _ => anyhow::bail!("the simulated fleet was not discovered within 15 s"),
        }
    }

    let mut outcomes: Vec<DispatchOutcome> = Vec::new();
    let mut errors = Vec::new();
    let publish = |topic: String, payload: Value| {
        let client = client.clone();
        async move { client.publish(topic, QoS::AtLeastOnce, false, payload.to_string()).await }
    };
    for (i, (kind, direction, kw, duration)) in SCRIPT.iter().enumerate() {
        let id = format!("demo-{:02}-{kind}-{direction}", i + 1);
        let signal = json!({"id": id, "type": kind, "direction": direction, "power_kw": kw, "duration_s": duration});
        let sent = Instant::now();
        publish(format!("{prefix}/signals"), signal).await?;
        let outcome = wait_for(&mut rx, &mut errors, Duration::from_secs(10), |topic, v| {
            (topic.contains("/dispatches/") && v["signal_id"] == id.as_str())
                .then(|| serde_json::from_value::<DispatchOutcome>(v.clone()).ok())
                .flatten()
        })
        .await
        .with_context(|| format!("no outcome for signal {id} within 10 s"))?;
        println!(
            "[{:>2}/{}] {:<5} {:<4} {:>7.1} kW -> {:>7.1} kW acknowledged, shortfall {:>7.1} kW | accepted {:>2}, rejected {}, timed out {}",
            i + 1,
            SCRIPT.len(),
            kind,
            direction,
            kw,
            outcome.acknowledged_kw,
            outcome.shortfall_kw,
            outcome.vehicles.accepted,
            outcome.vehicles.rejected,
            outcome.vehicles.timed_out
        );
        outcomes.push(outcome);
        // Its window ends before the next signal.
        tokio::time::sleep(Duration::from_secs(*duration).saturating_sub(sent.elapsed())).await;
    }

    // Bad input is answered on <p>/errors and changes nothing.
    println!("bad input:");
    let bad: [(String, Value); 4] = [
        (format!("{prefix}/signals"), json!({"id": "bad-1", "type": "afrr", "direction": "up", "power_kw": -5})),
        (
            format!("{prefix}/signals"),
            json!({"id": "demo-01-fcr-up", "type": "fcr", "direction": "up", "power_kw": 80}),
        ),
        (format!("{prefix}/vehicles/ev001/ack"), json!({"order_id": "no-such-order", "status": "accepted"})),
        (
            format!("{prefix}/bids"),
            json!({"request_id": "bid-1", "participant": "aggregator-a", "program": "winter-peak", "price_per_mw": 42.0,
                   "min_mw": 0.1, "max_mw": 0.3, "start": "2030-01-01T16:00:00Z", "end": "2030-01-01T18:00:00Z", "reliability": 0.95}),
        ),
    ];
    let ignored_acks = errors.len();
    errors.clear();
    for (topic, payload) in bad {
        publish(topic.clone(), payload).await?;
        let answer = wait_for(&mut rx, &mut Vec::new(), Duration::from_secs(5), |t, v| {
            (t.ends_with("/errors") && v["topic"] == topic.as_str())
                .then(|| v["error"].as_str().unwrap_or("").to_owned())
        })
        .await;
        let short = topic.trim_start_matches(&format!("{prefix}/")).to_owned();
        match answer {
            Some(e) => {
                println!("  {short:<22} -> {e}");
                errors.push(e);
            }
            None => println!("  {short:<22} -> (no answer within 5 s)"),
        }
    }

    let stats = sim.stats();
    controller.shutdown().await?;
    sim.stop();
    poller.abort();
    Ok(summary(&outcomes, ignored_acks, errors.len(), &stats))
}

/// Waits for the first message `pick` accepts; errors seen meanwhile are kept.
async fn wait_for<T>(
    rx: &mut mpsc::Receiver<(String, Value)>,
    errors: &mut Vec<String>,
    within: Duration,
    mut pick: impl FnMut(&str, &Value) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (topic, v) = tokio::time::timeout(left, rx.recv()).await.ok()??;
        if let Some(t) = pick(&topic, &v) {
            return Some(t);
        }
        if topic.ends_with("/errors") {
            errors.push(v["error"].as_str().unwrap_or("").to_owned());
        }
    }
}

fn summary(outcomes: &[DispatchOutcome], ignored_acks: usize, errors: usize, stats: &crate::sim::SimStats) -> String {
    let mut s = String::from("\nsummary\n");
    s.push_str(&format!(
        "{:<22} {:<5} {:<4} {:>10} {:>10} {:>10} {:>10}  {:<9} {:>4} {:>4} {:>4}\n",
        "dispatch", "type", "dir", "requested", "allocated", "acked", "shortfall", "fallback", "acc", "rej", "t/o"
    ));
    let mut totals: HashMap<&str, f64> = HashMap::new();
    let mut fallbacks = 0;
    for o in outcomes {
        s.push_str(&format!(
            "{:<22} {:<5} {:<4} {:>10.1} {:>10.1} {:>10.1} {:>10.1}  {:<9} {:>4} {:>4} {:>4}\n",
            o.dispatch_id,
            o.kind.name(),
            o.direction.as_str(),
            o.requested_kw,
            o.allocated_kw,
            o.acknowledged_kw,
            o.shortfall_kw,
            if o.vehicles.timed_out + o.vehicles.rejected > 0 {
                format!("{:?}", o.fallback).to_lowercase()
            } else {
                "-".into()
            },
            o.vehicles.accepted,
            o.vehicles.rejected,
            o.vehicles.timed_out
        ));
        *totals.entry("requested").or_default() += o.requested_kw;
        *totals.entry("acked").or_default() += o.acknowledged_kw;
        fallbacks += usize::from(o.vehicles.timed_out + o.vehicles.rejected > 0);
    }
    let (req, ack) = (totals.get("requested").copied().unwrap_or(0.0), totals.get("acked").copied().unwrap_or(0.0));
    s.push_str(&format!(
        "\n{} dispatches: {:.1} kW requested, {:.1} kW delivered ({:.0} %); {} needed the fallback round\n",
        outcomes.len(),
        req,
        ack,
        if req > 0.0 { 100.0 * ack / req } else { 0.0 },
        fallbacks
    ));
    s.push_str("bids: 1 submitted; this version has no bid book yet, so the gateway answered it on the errors topic\n");
    s.push_str(&format!(
        "{ignored_acks} ACKs arrived after their order was cancelled at its deadline: recorded, ignored, answered on the errors topic\n\
         {errors} bad inputs rejected with an error naming the field or the reason; nothing else changed\n"
    ));
    s.push_str(&format!(
        "fleet: {} messages on the order topics ({} of them cancels of unanswered orders), {} accepted, {} rejected\n",
        stats.orders_received, stats.cancels, stats.acks_accepted, stats.acks_rejected
    ));
    s
}
