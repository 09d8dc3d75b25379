//! Wiring: builds the actors of one gateway from a validated [`Config`], runs them until
//! asked to stop, and shuts down gracefully (in-flight dispatches settled and recorded,
//! `status` offline, connection closed).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::config::Config;
use gridweaver_core::dispatch::{Engine, Step};
use gridweaver_core::events::payload::ConfigRecorded;
use gridweaver_core::events::{Event, ProjectedState};
use gridweaver_core::replay::build;
use gridweaver_core::time::Timestamp;
use gridweaver_core::wire::Topics;
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};

use crate::bridge::{Disconnect, MqttBridge, Routes};
use crate::clock::now;
use crate::dispatcher::{Connect, DispatcherActor, EngineFactory, Intake, Shutdown};
use crate::environment::EnvironmentError;
use crate::publish::Publisher;
use crate::store::{self, StoreError, StoreHandle};
use crate::supervisor::Supervisor;

/// Why the gateway could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The event log.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file the config names (`mqtt.password_file`) could not be read.
    #[error(transparent)]
    Environment(#[from] EnvironmentError),
    /// An actor did not start.
    #[error("{0} did not start")]
    NotStarted(&'static str),
    /// An actor did not answer.
    #[error("{0} did not answer")]
    NotAnswering(&'static str),
}

/// The rumqttc options for `cfg`: TCP_NODELAY, a request channel and inflight window
/// sized for a whole dispatch, a persistent session and a last will (FACTS.md).
pub fn mqtt_options(cfg: &Config, topics: &Topics) -> Result<MqttOptions, ControllerError> {
    let mut opts = connection_options(cfg, &cfg.mqtt.client_id)?;
    // This connection only subscribes: its requests are a SUBSCRIBE and a DISCONNECT.
    opts.set_request_channel_capacity(16).set_last_will(LastWill::new(
        topics.status(),
        r#"{"state":"offline"}"#,
        QoS::AtLeastOnce,
        true,
    ));
    Ok(opts)
}

/// The MQTT options of the outbound connection (`<client_id>-out`: everything the gateway
/// publishes; no subscriptions, no last will).
pub fn outbound_options(cfg: &Config) -> Result<MqttOptions, ControllerError> {
    connection_options(cfg, &format!("{}-out", cfg.mqtt.client_id))
}

fn connection_options(cfg: &Config, client_id: &str) -> Result<MqttOptions, ControllerError> {
    let m = &cfg.mqtt;
    let mut opts = MqttOptions::new(client_id, &m.host, m.port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_s))
        .set_clean_session(false)
        .set_inflight(m.inflight)
        .set_max_packet_size(crate::publish::MAX_PACKET_BYTES, crate::publish::MAX_PACKET_BYTES);
    if let Some(user) = &m.username {
        let password = match &m.password_file {
            Some(file) => crate::environment::password(Path::new(file))?,
            None => String::new(),
        };
        opts.set_credentials(user, password);
    }
    Ok(opts)
}

fn read_state(cfg: &Config) -> Result<ProjectedState, StoreError> {
    Ok(store::project(Path::new(&cfg.store.path), None, false)?.into_state())
}

/// The engine for `cfg` as the log leaves it, and the step that closes what the last run
/// left unfinished: each unfinished dispatch is recorded as `DispatchInterrupted` (with its
/// outcome, which is then published) and its unanswered orders are cancelled; accepted
/// orders whose window is still open are committed again.
pub fn build_engine(cfg: &Config, recovery: &ProjectedState, t: Timestamp) -> (Engine, Step) {
    let mut engine = build::engine(cfg, recovery).unwrap_or_else(|e| {
        // Unreachable with a validated config; the gateway runs on without tuning.
        tracing::error!(error = %e, "tuner settings rejected; weights will not be tuned");
        Engine::new(build::planner(cfg, recovery))
    });
    // Each is settled now, with what it had delivered: recorded, and its outcome published
    // once that is durable.
    let configured = (cfg.dispatch.strategy, cfg.dispatch.fallback);
    let unfinished: Vec<_> = recovery
        .unfinished()
        .into_iter()
        .map(|(d, s)| {
            let outcome = recovery.interrupted_outcome(&d, t, configured);
            (d, s, outcome)
        })
        .collect();
    let step = engine.recover(t, &unfinished, &recovery.commitments_at(t));
    engine.restore_streams(t, &recovery.streams);
    if !unfinished.is_empty() {
        tracing::warn!(count = unfinished.len(), "dispatches interrupted by the last stop are recorded");
    }
    (engine, step)
}

/// The running gateway.
pub struct Controller {
    dispatcher: Addr<DispatcherActor>,
    bridge: Addr<MqttBridge>,
    publisher: Publisher,
    store: StoreHandle,
    store_thread: Option<std::thread::JoinHandle<()>>,
    /// The MQTT thread: both connections' event loops and the outbound drain task, off the
    /// actors' thread (none of them ever blocks).
    mqtt: Arbiter,
}

impl Controller {
    /// Starts every actor for `cfg`. Call inside an actix `System`.
    pub fn start(cfg: &Config) -> Result<Controller, ControllerError> {
        let mut conn = store::open_writer(Path::new(&cfg.store.path), cfg.store.sync_full)?;
        // The run's configuration opens it in the log: decisions from here on are re-run
        // under it, and the fleet is learnt again from the vehicles' retained states.
        let config = Event::of(now(), "gateway", &ConfigRecorded::of(cfg)).region(Some(&cfg.site));
        store::append_direct(&mut conn, vec![config])?;
        let recovery = read_state(cfg)?;
        let (store, store_thread) = StoreHandle::start(conn)?;

        let topics = Arc::new(Topics::new(cfg.mqtt.prefix.clone()));
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(cfg, &topics)?, 16);
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        eventloop.set_network_options(net.clone());
        let reconnect_max = Duration::from_secs(cfg.mqtt.reconnect_max_s);
        let mqtt = Arbiter::new();
        let publisher = Publisher::connect(outbound_options(cfg)?, net, topics.clone(), reconnect_max, &mqtt.handle());

        let first = std::cell::Cell::new(Some(recovery));
        let engine_cfg = cfg.clone();
        let rebuild: EngineFactory = Box::new(move || {
            // The first engine uses the recovery read at start; a restarted one reads the log again.
            let recovery = first.take().unwrap_or_else(|| {
                read_state(&engine_cfg).unwrap_or_else(|e| {
                    tracing::error!(error = %format!("{e:#}"), "cannot read the event log: duplicates may be dispatched again");
                    ProjectedState::default()
                })
            });
            build_engine(&engine_cfg, &recovery, now())
        });

        let (st, pb, intake) = (store.clone(), publisher.clone(), Intake::default());
        let counted = intake.clone();
        let dispatcher = actix::Supervisor::start(move |_| DispatcherActor::new(rebuild, st, pb).with_intake(counted));
        let supervisor =
            Supervisor::new(dispatcher.clone(), store.clone(), publisher.clone(), cfg.site.clone()).start();
        dispatcher
            .try_send(Connect { resync: supervisor.clone().recipient() })
            .map_err(|_| ControllerError::NotStarted("the dispatcher"))?;
        let routes = Routes {
            dispatcher: dispatcher.clone(),
            supervisor,
            store: store.clone(),
            publisher: publisher.clone(),
            region: cfg.site.clone(),
            intake,
        };
        publisher.on_link(dispatcher.clone().recipient());
        let bridge = MqttBridge::start_in_arbiter(&mqtt.handle(), move |_| {
            MqttBridge::new(client, eventloop, routes, topics, reconnect_max)
        });
        Ok(Controller { dispatcher, bridge, publisher, store, store_thread: Some(store_thread), mqtt })
    }

    /// The dispatcher, for tests and the demo.
    pub fn dispatcher(&self) -> &Addr<DispatcherActor> {
        &self.dispatcher
    }

    /// Settles what is in flight, publishes `status` offline, disconnects, and waits for
    /// the log to be written.
    pub async fn shutdown(mut self) -> Result<(), ControllerError> {
        let settled =
            self.dispatcher.send(Shutdown).await.map_err(|_| ControllerError::NotAnswering("the dispatcher"))?;
        tracing::info!(settled, "in-flight dispatches settled");
        self.publisher.status(false);
        // The outbound connection first, once the broker has acknowledged everything it
        // published (`offline` included); then the inbound one, whose DISCONNECT keeps the
        // broker from publishing its last will (a second `offline`).
        self.publisher.disconnect(crate::publish::DISCONNECT_WAIT).await;
        let _ = tokio::time::timeout(Duration::from_secs(3), self.bridge.send(Disconnect)).await;
        // The bridge stops once the broker has closed the connection after our DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while self.bridge.connected() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        self.mqtt.stop();
        let _ = self.store.checkpoint().await;
        drop(self.store);
        if let Some(join) = self.store_thread.take() {
            // The thread ends when every handle is gone; actors still hold some until the
            // system stops, so do not wait for it here.
            drop(join);
        }
        Ok(())
    }
}

/// Runs a gateway until `stop` resolves, then shuts it down gracefully.
pub async fn run_until(cfg: &Config, stop: impl Future<Output = ()>) -> Result<(), ControllerError> {
    let controller = Controller::start(cfg)?;
    stop.await;
    tracing::info!("stopping");
    controller.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use gridweaver_core::allocation::filter::SimpleVehicleFilter;
    use gridweaver_core::allocation::{Allocation, AllocationRequest, Dispatcher, SmartDispatcher};
    use gridweaver_core::dispatch::{EngineConfig, Planner};
    use gridweaver_core::model::{Direction, Signal, SignalType, StrategyKind, Vehicle};

    use super::*;
    use crate::dispatcher::SignalIn;
    use crate::store::{Query, Reader};
    use crate::supervisor::VehicleStateIn;
    use gridweaver_core::events::EventKind;

    /// A strategy with a bug: it panics.
    struct Explodes;

    impl Dispatcher for Explodes {
        fn kind(&self) -> StrategyKind {
            StrategyKind::Smart
        }
        fn allocate(&mut self, _req: &AllocationRequest<'_>) -> Allocation {
            panic!("a bug in a strategy")
        }
    }

    fn signal(id: &str) -> Signal {
        Signal::new(id, SignalType::Afrr, Direction::Up, 5.0, now())
    }

    /// What a live engine learned is what an engine rebuilt from its log knows: fairness
    /// scores, commitments in force, seen signals, dispatch numbering.
    #[test]
    fn an_engine_rebuilt_from_the_log_knows_what_the_live_one_learned() {
        use gridweaver_core::model::{Ack, AckStatus};
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("log.db");
        let yaml = format!(
            "site: a\nstore: {{ path: {:?} }}\ndispatch: {{ ack_timeout_seconds: 1, fallback: noop }}\n",
            db.display().to_string()
        );
        let cfg = Config::from_yaml(&yaml).unwrap();
        let t0 = now();
        let (mut live, _) = build_engine(&cfg, &ProjectedState::default(), t0);
        let mut events = Vec::new();
        for i in 0..6 {
            let v = Vehicle::new(format!("v{i}"), 0.8, 60.0, 10.0 + i as f64);
            events.extend(live.on_state(t0, v.id.clone(), Some(v)).1);
        }
        for k in 0..5 {
            let t = t0.plus_millis(k * 10);
            let step = live.on_signal(t, Signal { start: t, ..signal(&format!("s{k}")) }).unwrap();
            events.extend(step.events);
            for (j, o) in step.orders.iter().enumerate() {
                let status = if j % 3 == 0 { AckStatus::Rejected } else { AckStatus::Accepted };
                let ack = Ack { order_id: o.order_id.to_string(), status, reason: None };
                events.extend(live.on_ack(t, &o.vehicle_id, &ack).unwrap().events);
            }
            for step in live.on_timeout(t.plus_millis(1_000)) {
                events.extend(step.events);
            }
        }
        let mut conn = store::open_writer(&db, false).unwrap();
        store::append_direct(&mut conn, events).unwrap();
        let recovery = store::project(&db, None, true).unwrap().into_state();
        let (mut rebuilt, step) = build_engine(&cfg, &recovery, t0.plus_millis(2_000));
        assert!(step.cancels.is_empty() && step.events.is_empty(), "nothing was left unfinished");

        let scores = |e: &Engine| {
            let mut p: Vec<(String, f64)> =
                e.planner().participation().iter().map(|(v, s)| (v.as_str().to_owned(), *s)).collect();
            p.sort_by(|a, b| a.0.cmp(&b.0));
            p
        };
        assert_eq!(scores(&rebuilt), scores(&live));
        let committed =
            |e: &Engine| e.ledger().iter().map(|c| (c.order_id.clone(), c.power_kw, c.accepted)).collect::<Vec<_>>();
        assert_eq!(committed(&rebuilt), committed(&live));
        assert!(!committed(&live).is_empty());
        let t = t0.plus_millis(3_000);
        assert!(rebuilt.on_signal(t, Signal { start: t, ..signal("s2") }).is_err(), "a seen id stays a duplicate");
        let next = rebuilt.on_signal(t, Signal { start: t, ..signal("new") }).unwrap();
        assert!(next.events[2].correlation_id.as_deref().unwrap().ends_with("-6"), "numbering goes on");
    }

    #[actix_rt::test]
    async fn a_dispatcher_that_panics_is_restarted_with_its_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("log.db");
        let (store, _join) = StoreHandle::start(store::open_writer(&db, false).unwrap()).unwrap();
        // A client whose event loop is never polled: publishes just queue up.
        let (client, _eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 9), 10_000);
        let publisher = Publisher::new(client, Arc::new(Topics::new("t")));
        let builds = Rc::new(Cell::new(0));
        let counter = builds.clone();
        let rebuild: EngineFactory = Box::new(move || {
            counter.set(counter.get() + 1);
            let strategy: Box<dyn Dispatcher> =
                if counter.get() == 1 { Box::new(Explodes) } else { Box::new(SmartDispatcher::default()) };
            let planner = Planner::new(EngineConfig::default(), Box::new(SimpleVehicleFilter), strategy);
            (Engine::new(planner), Step::default())
        });
        let (st, pb) = (store.clone(), publisher.clone());
        let dispatcher = actix::Supervisor::start(move |_| DispatcherActor::new(rebuild, st, pb));
        let supervisor = Supervisor::new(dispatcher.clone(), store.clone(), publisher, "default".into()).start();
        dispatcher.send(Connect { resync: supervisor.clone().recipient() }).await.unwrap();
        let v = Vehicle::new("ev1", 0.8, 60.0, 11.0);
        supervisor.send(VehicleStateIn { id: v.id.clone(), state: Some(v), at: now() }).await.unwrap();
        dispatcher.send(crate::dispatcher::Subscribed).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;

        dispatcher.send(SignalIn { signal: signal("boom"), at: now() }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(builds.get(), 2, "the engine was rebuilt once");
        dispatcher.send(SignalIn { signal: signal("fine"), at: now() }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.flush().await.unwrap();

        let mut plans = Vec::new();
        Reader::open(&db)
            .unwrap()
            .for_each(&Query { kind: Some(EventKind::DispatchPlanCreated), ..Query::default() }, |e| {
                plans.push(e);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        assert_eq!(plans.len(), 1, "only the second signal was planned");
        assert_eq!(plans[0].payload["signal_id"], "fine");
        assert_eq!(plans[0].payload["fleet"]["vehicles"], 1, "the fleet was re-reported");
    }
}
