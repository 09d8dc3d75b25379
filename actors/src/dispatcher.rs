//! DispatcherActor: owns the core [`Engine`], the one writer of all dispatch state (the
//! fleet view, the dispatches in flight, the commitment ledger, the memory of signals).
//!
//! Signals and ACKs come straight from the bridge, vehicle states from the vehicle actors.
//! Every [`Step`] the engine returns (a fallback runs inside the step that settles an
//! attempt) is carried out here in the contract's order: its events go to the store, and
//! only once they are durable are its cancels and orders published (the ACK window of
//! those orders starts then) and its outcomes published. One timer is armed for the engine's
//! earliest deadline. When the store cannot commit a step, nothing of it is published, its
//! dispatches are closed as failed, and new signals are refused until the store works again.
//!
//! Supervised: a panic in a core call stops the actor, and actix restarts it with an engine
//! rebuilt from the event log (what was in flight is recorded as interrupted and its
//! unanswered orders cancelled); the vehicle actors then report the fleet again.

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use actix::prelude::*;
use gridweaver_core::dispatch::{AckIgnored, Capacity, Engine, Step};
use gridweaver_core::events::pipeline::{Envelope, UnifiedPipeline};
use gridweaver_core::events::{Event, EventKind};
use gridweaver_core::model::{Ack, DispatchOutcome, Order, OrderCancel, Signal, Vehicle, VehicleId};
use gridweaver_core::time::Timestamp;

use crate::clock::now;
use crate::guard::guarded;
use crate::publish::{reject, Link, Publisher, Refusal, Side};
use crate::store::{Appended, Durable, StoreHandle};

/// How often the retained `<p>/capacity` is refreshed when it changed, at most.
const CAPACITY_EVERY: Duration = Duration::from_millis(250);

/// Builds the engine from the config and the event log, with the step that records and
/// withdraws what a previous run (or a crashed actor) left unfinished.
pub type EngineFactory = Box<dyn Fn() -> (Engine, Step)>;

/// Asks the fleet's owner (the supervisor) to report every vehicle again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync;

/// Plans and follows dispatches.
pub struct DispatcherActor {
    engine: Engine,
    rebuild: EngineFactory,
    /// Carried out once the actor runs: the recovery step of the engine just built.
    recovery: Option<Step>,
    resync: Option<Recipient<Resync>>,
    store: StoreHandle,
    publisher: Publisher,
    timer: Option<(Timestamp, SpawnHandle)>,
    capacity_dirty: bool,
    last_capacity: Option<(f64, f64, usize)>,
    completed: u64,
    /// While the store cannot commit: why, since when, and how many signals were refused.
    /// Steps whose events are with the store, oldest first: published in this order once
    /// durable (by [`Pump`], or at the start of the next message: [`DispatcherActor::service`]).
    unpublished: VecDeque<Unpublished>,
    /// The [`Pump`] running while `unpublished` is not empty.
    pump: Option<SpawnHandle>,
    /// What the store's queue had no room for yet, in order: handed over as room appears,
    /// the mailbox paused meanwhile (asynchronously: the thread is never blocked), so that
    /// the back-pressure reaches the bridge's bounded inbox.
    outbox: VecDeque<ToStore>,
    /// A wait for the store's room is armed (one at a time).
    awaiting_room: bool,
    /// The live tail's pipeline.
    tail: UnifiedPipeline<String>,
    /// Whether the inbound and the outbound connection are up (as they said).
    links: (bool, bool),
    /// Since when the broker connection is lost (the bridge said so): ACK deadlines wait,
    /// and every attempt waiting gets its whole window again when the link is back.
    link_lost: Option<Timestamp>,
    /// Shutting down: `status` is the bridge's to publish (offline).
    stopping: bool,
    /// Until the fleet is learnt after start-up: the signals held back meanwhile.
    warmup: Option<Warmup>,
    /// Signals on their way from the bridge.
    intake: Intake,
}

/// Start-up: the gateway knows no vehicle until the broker re-sends their retained states,
/// which it does after the subscription is acknowledged; a signal the broker kept for the
/// gateway's session arrives before them. Such signals are held back (in order, with the
/// time received) until the states have come in: [`FLEET_QUIET`] without a new one after
/// [`FLEET_SETTLE_MIN`], at most [`FLEET_SETTLE_MAX`] after the subscription. A vehicle with
/// power committed (restored from the log) whose state the broker did not send by then has
/// left while the gateway was down (its retained state was cleared): it is recorded lost,
/// its commitments released ([`Engine::release_absent`]).
struct Warmup {
    held: Vec<SignalIn>,
    subscribed: Option<tokio::time::Instant>,
    last_state: tokio::time::Instant,
    check: Option<SpawnHandle>,
}

/// Held back at most (more are refused on `errors`: the gateway is starting).
const WARMUP_HELD: usize = 256;
const FLEET_SETTLE_MIN: Duration = Duration::from_millis(300);
const FLEET_QUIET: Duration = Duration::from_millis(200);
const FLEET_SETTLE_MAX: Duration = Duration::from_secs(3);

/// What waits to be handed to the store, in the order it was decided: a step (published
/// once durable) or rows that gate nothing.
enum ToStore {
    Step(Vec<Event>, Unpublished),
    Record(Vec<Event>),
}

/// A step whose events are with the store: what it publishes once they are durable.
struct Unpublished {
    /// The store's answer (`None` while the step waits in the outbox).
    durable: Option<Durable>,
    cancels: Vec<OrderCancel>,
    orders: Vec<Order>,
    outcomes: Vec<DispatchOutcome>,
    /// The dispatches it is about (closed as failed if it cannot be recorded).
    touched: BTreeSet<String>,
    rows: usize,
    queued: std::time::Instant,
}

/// Publishes the steps of [`DispatcherActor::unpublished`] in order as the store makes each
/// durable; ends when none is left (the next [`DispatcherActor::carry_out`] starts another).
struct Pump;

impl ActorFuture<DispatcherActor> for Pump {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut DispatcherActor,
        ctx: &mut Context<DispatcherActor>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<()> {
        act.publish_durable(ctx, |durable| match std::future::Future::poll(Pin::new(durable), task) {
            Poll::Pending => None,
            Poll::Ready(result) => Some(result.unwrap_or_else(|_| Err("the store thread is gone".into()))),
        });
        if act.unpublished.is_empty() {
            act.pump = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A signal that waited longer than this between the bridge and the planner is refused
/// (the gateway is behind; a late activation is worse than a clear refusal), so that a
/// flood is answered at the cost of a refusal and a fresh signal after it is planned soon.
const SIGNAL_WAIT_MAX_MS: i64 = 1_000;

/// Signals on their way from the bridge to the planner, at most; the bridge refuses more
/// itself (so it never waits on a mailbox full of signals, and keeps the connection moving
/// both ways).
pub const SIGNALS_WAITING_MAX: usize = 128;

/// The count of signals between the bridge and the planner, shared by both.
#[derive(Clone, Debug, Default)]
pub struct Intake(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Intake {
    /// Counts one more signal in, unless [`SIGNALS_WAITING_MAX`] already wait: then `Err`
    /// with how many.
    pub fn enter(&self) -> Result<(), usize> {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < SIGNALS_WAITING_MAX).then_some(n + 1))
            .map(|_| ())
    }

    /// A signal reached the planner.
    fn leave(&self) {
        use std::sync::atomic::Ordering;
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
    }
}

/// Rows the live tail holds between a commit and its publish.
const TAIL_CAPACITY: usize = 32_768;

/// How often `status` carries fresh pipeline counters.
const STATUS_EVERY: Duration = Duration::from_secs(10);

impl DispatcherActor {
    /// An actor around an engine made by `rebuild` (which it calls again on restart).
    pub fn new(rebuild: EngineFactory, store: StoreHandle, publisher: Publisher) -> Self {
        let (engine, recovery) = rebuild();
        Self {
            engine,
            rebuild,
            recovery: Some(recovery),
            resync: None,
            store,
            publisher,
            timer: None,
            capacity_dirty: true,
            last_capacity: None,
            completed: 0,
            unpublished: VecDeque::new(),
            pump: None,
            outbox: VecDeque::new(),
            awaiting_room: false,
            tail: UnifiedPipeline::new(TAIL_CAPACITY, TAIL_CAPACITY).sort_by_sequence(),
            links: (false, false),
            link_lost: None,
            stopping: false,
            warmup: Some(Warmup {
                held: Vec::new(),
                subscribed: None,
                last_state: tokio::time::Instant::now(),
                check: None,
            }),
            intake: Intake::default(),
        }
    }

    /// Shares `intake` with the bridge, which counts signals in through it.
    pub fn with_intake(mut self, intake: Intake) -> Self {
        self.intake = intake;
        self
    }

    /// Ends the start-up hold once the fleet's states have come in; the held signals are
    /// then dispatched in the order they arrived.
    fn check_warmup(&mut self, ctx: &mut Context<Self>) {
        let Some(w) = &self.warmup else { return };
        let Some(subscribed) = w.subscribed else { return };
        let since = subscribed.elapsed();
        let settled = since >= FLEET_SETTLE_MAX || (since >= FLEET_SETTLE_MIN && w.last_state.elapsed() >= FLEET_QUIET);
        if !settled {
            return;
        }
        if let Some(mut w) = self.warmup.take() {
            if let Some(check) = w.check.take() {
                ctx.cancel_future(check);
            }
            let engine = &mut self.engine;
            let Some(lost) = guarded("releasing absent vehicles", || engine.release_absent(now())) else {
                // The held signals wait for the restarted actor, whose start arms the check again.
                self.warmup = Some(w);
                ctx.stop();
                return;
            };
            let gone = lost.len();
            if gone > 0 {
                tracing::info!(gone, "vehicles with power committed sent no state after the restart (they left while the gateway was down): recorded lost, their commitments released");
                self.record(lost, ctx);
            }
            self.capacity_dirty = true;
            self.publish_capacity();
            tracing::info!(vehicles = self.engine.planner().fleet().count(), gone, held = w.held.len(), "fleet learnt");
            for signal in w.held {
                self.signal_in(signal, ctx);
            }
        }
    }

    fn region(&self) -> String {
        self.engine.planner().config().region.clone()
    }

    /// What is due, done before the message at hand: steps now durable are published,
    /// deadlines past are settled (a due record of ACKs among them). actix runs an actor's
    /// timers and futures only once its mailbox is empty, which under a flood it never is;
    /// without this, decided orders would wait behind the flood (and their replies pile up
    /// in memory) and no ACK deadline would expire.
    fn service(&mut self, ctx: &mut Context<Self>) {
        // Taken without polling: the pump's waker stays the one registered.
        let durable = |rx: &mut Durable| match rx.try_recv() {
            Ok(result) => Some(result),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Some(Err("the store thread is gone".into())),
        };
        if self.publish_durable(ctx, durable) {
            // The pump waited on a step taken here: a new one waits on the new head.
            if let Some(pump) = self.pump.take() {
                ctx.cancel_future(pump);
            }
            if !self.unpublished.is_empty() {
                self.pump = Some(ctx.spawn(Pump));
            }
        }
        if let Some((deadline, handle)) = self.timer {
            if deadline <= now() {
                ctx.cancel_future(handle);
                self.timer = None;
                self.settle_deadlines(ctx);
            }
        }
    }

    /// Publishes the steps at the head of `unpublished` whose store answer `take` gives, in
    /// order, up to the first it does not. Whether any was published.
    fn publish_durable(
        &mut self,
        ctx: &mut Context<Self>,
        mut take: impl FnMut(&mut Durable) -> Option<Result<Appended, String>>,
    ) -> bool {
        let mut published = false;
        while let Some(head) = self.unpublished.front_mut() {
            let Some(result) = head.durable.as_mut().and_then(&mut take) else { break };
            if let Some(step) = self.unpublished.pop_front() {
                self.publish_step(step, result, ctx);
                published = true;
            }
        }
        published
    }

    /// Hands durable rows to the live tail through its pipeline (de-duplicated by seq,
    /// in seq order, bounded: a row it cannot take is counted as refused, never queued
    /// without limit; the tail is QoS 0 and for watching, the log has every row).
    fn tail(&mut self, appended: crate::store::Appended) {
        let t = now();
        for (e, seq) in appended.events.into_iter().zip(appended.first_seq..) {
            let row = crate::store::tail_json(seq, &e);
            let envelope = Envelope { id: None, seq: Some(seq), kind: e.kind, region: e.region, item: row };
            if self.tail.submit(t, envelope).is_err() {
                tracing::debug!(seq, "the live tail is full; a row is left to the log");
            }
        }
        let rows = self.tail.drain(t).into_iter().map(|e| e.item).collect();
        self.publisher.tail(rows);
    }

    /// Both connections to the broker are up.
    fn online(&self) -> bool {
        self.links.0 && self.links.1
    }

    /// Publishes `status` with the pipeline's counters (while online and not stopping).
    fn publish_status(&self) {
        if self.online() && !self.stopping {
            let (events, store) = (self.tail.counters(), self.store.counters());
            self.publisher.status_with(&serde_json::json!({ "events": events, "store": store }));
        }
    }

    /// Publishes the capacity when it changed (commitments, fleet, or windows ending).
    fn publish_capacity(&mut self) {
        if self.warmup.is_some() {
            // Not before the fleet is learnt: a retained `0 vehicles` would mislead.
            return;
        }
        if !std::mem::take(&mut self.capacity_dirty) && self.engine.ledger().is_empty() {
            return;
        }
        let engine = &mut self.engine;
        let Some(cap) = guarded("computing the capacity", || engine.capacity(now())) else { return };
        let key = (cap.up_kw, cap.down_kw, cap.vehicles);
        if self.last_capacity != Some(key) {
            self.last_capacity = Some(key);
            self.publisher.capacity(&cap);
        }
    }

    /// Carries out a step: events durable first, then cancels, orders, outcomes and the
    /// live tail; the timer is re-armed.
    fn carry_out(&mut self, step: Step, ctx: &mut Context<Self>) {
        // The engine has learnt from the answers already (prediction, tuner).
        let Step { events, cancels, orders, outcomes, .. } = step;
        self.capacity_dirty |= !orders.is_empty() || !cancels.is_empty() || !outcomes.is_empty();
        if events.is_empty() {
            self.arm_timer(ctx);
            return;
        }
        let (queued, rows) = (std::time::Instant::now(), events.len());
        // The dispatches this step is about: if it cannot be recorded, they are closed.
        let touched: BTreeSet<String> = events.iter().filter_map(|e| e.correlation_id.clone()).collect();
        let step = Unpublished { durable: None, cancels, orders, outcomes, touched, rows, queued };
        self.send_to_store(ToStore::Step(events, step), ctx);
        self.arm_timer(ctx);
    }

    /// Hands `item` to the store after everything before it; what the store's queue has no
    /// room for waits in the outbox.
    fn send_to_store(&mut self, item: ToStore, ctx: &mut Context<Self>) {
        self.outbox.push_back(item);
        if !self.awaiting_room {
            self.hand_over(ctx);
        }
    }

    /// Hands the outbox to the store, in order, while its queue has room. What is left waits
    /// for room with the mailbox paused: no message is taken meanwhile (the bridge's inbox,
    /// bounded, takes the back-pressure), and no thread blocks.
    fn hand_over(&mut self, ctx: &mut Context<Self>) {
        while let Some(item) = self.outbox.pop_front() {
            let left = match item {
                ToStore::Step(events, mut step) => match self.store.try_append(events) {
                    Ok(durable) => {
                        step.durable = Some(durable);
                        self.unpublished.push_back(step);
                        if self.pump.is_none() {
                            self.pump = Some(ctx.spawn(Pump));
                        }
                        None
                    }
                    Err(events) => Some(ToStore::Step(events, step)),
                },
                ToStore::Record(events) => self.store.try_record(events).err().map(ToStore::Record),
            };
            if let Some(item) = left {
                let n = match &item {
                    ToStore::Step(events, _) | ToStore::Record(events) => events.len(),
                };
                self.outbox.push_front(item);
                tracing::debug!(
                    waiting = self.outbox.len(),
                    "the event log's queue is full: the dispatcher waits for room"
                );
                self.awaiting_room = true;
                let room = self.store.room(n, 0).into_actor(self).map(|_, act, ctx| {
                    act.awaiting_room = false;
                    act.hand_over(ctx);
                });
                ctx.wait(room);
                return;
            }
        }
    }

    /// Records `events` (rows that gate nothing) after everything decided before them.
    fn record(&mut self, events: Vec<Event>, ctx: &mut Context<Self>) {
        if !events.is_empty() {
            self.send_to_store(ToStore::Record(events), ctx);
        }
    }

    /// The second half of [`DispatcherActor::carry_out`], once the store has answered.
    fn publish_step(&mut self, step: Unpublished, result: Result<Appended, String>, ctx: &mut Context<Self>) {
        let Unpublished { cancels, orders, outcomes, touched, rows, queued, .. } = step;
        let appended = match result {
            Ok(appended) => appended,
            Err(e) => return self.step_failed(e, touched, ctx),
        };
        if let Some(outage) = self.engine.log_written() {
            tracing::info!(refused = outage.refused, "the event log is writable again; signals are accepted");
        }
        tracing::debug!(rows, orders = orders.len(), durable_us = queued.elapsed().as_micros() as u64, "step durable");
        for c in &cancels {
            self.publisher.cancel(c);
        }
        for o in &orders {
            self.publisher.order(o);
        }
        // The ACK window of these orders starts now that they are on their way.
        let published = now();
        let dispatches: BTreeSet<&str> = orders.iter().map(|o| o.dispatch_id.as_str()).collect();
        for d in dispatches {
            self.engine.published(d, published);
        }
        for outcome in outcomes {
            self.publisher.outcome(&outcome);
            self.completed += 1;
        }
        self.tail(appended);
        self.arm_timer(ctx);
    }

    /// The store could not commit a step: nothing of it is published and nothing after it
    /// runs; the dispatches it was about are closed as failed (recorded once
    /// the store works again), their commitments released and their signals answered on
    /// `errors` (a signal whose plan was not recorded may be sent again); new signals are
    /// refused, and the log tried again, at the engine's deadline until a step is written.
    fn step_failed(&mut self, why: String, dispatches: BTreeSet<String>, ctx: &mut Context<Self>) {
        tracing::error!(error = %why, "a decision was not durable: nothing of it is published");
        let t = now();
        // Signals are refused, and the log tried again, at the engine's deadline.
        self.engine.log_failed(t, &why);
        let topic = self.publisher.topics().signals();
        for d in dispatches {
            let engine = &mut self.engine;
            let reason = format!("event log write failed: {why}");
            if let Some(Some(mut step)) = guarded("closing a failed dispatch", || engine.abort(t, &d, &reason)) {
                for outcome in std::mem::take(&mut step.outcomes) {
                    let msg = format!(
                        "signal `{}` was not dispatched: the event log cannot be written ({why}); nothing was ordered",
                        outcome.signal_id
                    );
                    self.publisher.error(&topic, &msg, t, Some(&outcome.signal_id));
                }
                // Its orders never went out: nothing to withdraw on the wire. The events are
                // kept for the log, which takes them once it works again.
                step.cancels.clear();
                self.record(step.events, ctx);
            }
        }
    }

    fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        // Without the broker no order reaches a vehicle and no answer comes back: deadlines wait.
        let next = if self.link_lost.is_some() { None } else { self.engine.next_deadline() };
        if self.timer.as_ref().map(|(t, _)| *t) == next {
            return;
        }
        if let Some((_, handle)) = self.timer.take() {
            ctx.cancel_future(handle);
        }
        let Some(deadline) = next else { return };
        let wait = u64::try_from(deadline.as_millis() - now().as_millis()).unwrap_or(0);
        let handle = ctx.run_later(Duration::from_millis(wait), |act, ctx| {
            act.timer = None;
            act.settle_deadlines(ctx);
        });
        self.timer = Some((deadline, handle));
    }

    /// Settles what is past its deadline (ACK windows, windows ending) and re-arms the timer.
    fn settle_deadlines(&mut self, ctx: &mut Context<Self>) {
        let engine = &mut self.engine;
        match guarded("settling deadlines", || engine.on_timeout(now())) {
            Some(steps) => {
                for step in steps {
                    self.carry_out(step, ctx);
                }
                self.arm_timer(ctx);
            }
            None => ctx.stop(),
        }
    }

    /// Refuses an ACK the engine ignored: recorded as `InputRejected`, correlated with its
    /// dispatch when the order is known to be the sender's (late, answered twice).
    fn refuse_ack(&self, msg: &AckIn, ignored: &AckIgnored) {
        let topic = self.publisher.topics().vehicle_ack(&msg.vehicle);
        let raw = serde_json::to_vec(&msg.ack).unwrap_or_default();
        let why = ignored.to_string();
        tracing::info!(%topic, reason = %why, "ACK ignored");
        let refusal = Refusal {
            kind: EventKind::InputRejected,
            actor: format!("vehicle/{}", msg.vehicle),
            topic: &topic,
            why: &why,
            payload: &raw,
            received_at: msg.at,
            reference: Some(&msg.ack.order_id),
            correlation: ignored.dispatch(),
            reason: ignored.code().to_owned(),
        };
        reject(&self.store, &self.publisher, &self.region(), refusal);
    }

    /// Refuses `signal`, received at `at`, for `why`: answered on `errors`, recorded as
    /// `SignalRejected` with the signal as the gateway read it.
    fn refuse_signal(&self, signal: &Signal, at: Timestamp, why: &str, reason: &str) {
        let topic = self.publisher.topics().signals();
        let raw = serde_json::to_vec(signal).unwrap_or_default();
        tracing::info!(%topic, reason = %why, "signal refused");
        let refusal = Refusal {
            kind: EventKind::SignalRejected,
            actor: "dispatcher".to_owned(),
            topic: &topic,
            why,
            payload: &raw,
            received_at: at,
            reference: Some(&signal.id),
            correlation: None,
            reason: reason.to_owned(),
        };
        reject(&self.store, &self.publisher, &self.region(), refusal);
    }
}

impl Actor for DispatcherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(crate::MAILBOX);
        // Rows recorded without a step (rejections, fleet changes, the config) reach the
        // live tail too; a full mailbox leaves them to the log (the tail is QoS 0).
        let me = std::sync::Mutex::new(ctx.address().recipient::<TailRows>());
        self.store.set_tail(Box::new(move |rows| {
            if let Ok(me) = me.lock() {
                let _ = me.try_send(TailRows(rows));
            }
        }));
        ctx.run_interval(CAPACITY_EVERY, |act, _| act.publish_capacity());
        ctx.run_interval(STATUS_EVERY, |act, _| act.publish_status());
        if let Some(step) = self.recovery.take() {
            self.carry_out(step, ctx);
        }
        // A restart during the start-up hold: its check is armed again.
        if let Some(w) = self.warmup.as_mut().filter(|w| w.subscribed.is_some()) {
            w.check = Some(ctx.run_interval(Duration::from_millis(50), |act, ctx| act.check_warmup(ctx)));
        }
    }
}

impl Supervised for DispatcherActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!("dispatcher restarting: engine rebuilt from the event log, fleet re-reported");
        let (engine, recovery) = (self.rebuild)();
        // An outage of the log outlives the engine: it is still refused and tried.
        let outage = self.engine.log_outage().cloned();
        self.engine = engine;
        self.engine.set_log_outage(outage);
        self.recovery = Some(recovery);
        self.timer = None;
        // Timers and futures of the old context are gone with it. Steps not yet published
        // are the rebuilt engine's to recover from the log (interrupted, orders cancelled).
        self.pump = None;
        self.unpublished.clear();
        self.outbox.clear();
        self.awaiting_room = false;
        self.capacity_dirty = true;
        if let Some(r) = &self.resync {
            let _ = r.try_send(Resync);
        }
    }
}

/// Connects the fleet's owner (started after the dispatcher).
/// Durable rows for the live tail (of events recorded outside a step).
#[derive(Message)]
#[rtype(result = "()")]
pub struct TailRows(pub crate::store::Appended);

impl Handler<TailRows> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: TailRows, ctx: &mut Context<Self>) {
        self.service(ctx);
        self.tail(msg.0);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    /// Re-reports the fleet after a restart.
    pub resync: Recipient<Resync>,
}

impl Handler<Connect> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: Connect, _ctx: &mut Context<Self>) {
        self.resync = Some(msg.resync);
    }
}

/// A decoded signal from `<p>/signals`, with the time the bridge received it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignalIn {
    /// The signal.
    pub signal: Signal,
    /// When it arrived.
    pub at: Timestamp,
}

impl Handler<SignalIn> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: SignalIn, ctx: &mut Context<Self>) {
        self.intake.leave();
        self.service(ctx);
        if let Some(w) = &mut self.warmup {
            if w.held.len() < WARMUP_HELD {
                w.held.push(msg);
            } else {
                let why = format!(
                    "signal `{}` was not dispatched: the gateway is starting and still learning its fleet ({WARMUP_HELD} signals already wait); send it again",
                    msg.signal.id
                );
                self.refuse_signal(&msg.signal, msg.at, &why, "starting");
            }
            return;
        }
        let waited = now().as_millis().saturating_sub(msg.at.as_millis());
        if waited > SIGNAL_WAIT_MAX_MS {
            // Admission: the gateway is behind (a flood); a refusal costs far less than a plan.
            let why = format!(
                "signal `{}` was not dispatched: it waited {waited} ms for the planner (at most {SIGNAL_WAIT_MAX_MS} ms): the gateway is behind; send it again later",
                msg.signal.id
            );
            return self.refuse_signal(&msg.signal, msg.at, &why, "waited");
        }
        self.signal_in(msg, ctx);
    }
}

/// The bridge's subscriptions were acknowledged (the retained vehicle states follow).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribed;

impl Handler<Subscribed> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, _: Subscribed, ctx: &mut Context<Self>) {
        if let Some(w) = &mut self.warmup {
            if w.subscribed.is_none() {
                w.subscribed = Some(tokio::time::Instant::now());
                w.check = Some(ctx.run_interval(Duration::from_millis(50), |act, ctx| act.check_warmup(ctx)));
            }
        }
    }
}

impl DispatcherActor {
    /// A signal, once the fleet is known: admitted, planned and carried out, or refused.
    fn signal_in(&mut self, msg: SignalIn, ctx: &mut Context<Self>) {
        if let Some(queued) = self.publisher.busy() {
            // Admission: what is decided must go out; the broker is not keeping up.
            let why = format!(
                "signal `{}` was not dispatched: the gateway is behind publishing ({queued} messages waiting for the broker); send it again later",
                msg.signal.id
            );
            self.refuse_signal(&msg.signal, msg.at, &why, "publisher_busy");
            return;
        }
        if let Some(backlog) = self.store.behind() {
            // Admission: the log is not keeping up, so no new dispatch is queued behind it
            // (what is in flight goes on; the refusal itself is recorded).
            let why = format!(
                "signal `{}` was not dispatched: the event log is behind ({} events, {} KB waiting to be written); send it again later",
                msg.signal.id,
                backlog.events,
                backlog.bytes / 1024
            );
            self.refuse_signal(&msg.signal, msg.at, &why, "log_behind");
            return;
        }
        let started = std::time::Instant::now();
        let engine = &mut self.engine;
        let signal = msg.signal;
        let Some(planned) = guarded("planning a dispatch", || engine.on_signal(msg.at, signal.clone())) else {
            ctx.stop();
            return;
        };
        tracing::debug!(signal = %signal.id, plan_us = started.elapsed().as_micros() as u64, "planned");
        match planned {
            Ok(step) => self.carry_out(step, ctx),
            Err(refused) if !refused.recorded() => {
                let topic = self.publisher.topics().signals();
                self.publisher.error(&topic, &refused.to_string(), msg.at, Some(&signal.id));
            }
            Err(refused) => self.refuse_signal(&signal, msg.at, &refused.to_string(), refused.code()),
        }
    }
}

/// An ACK from a vehicle's `ack` topic, with the time the bridge received it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AckIn {
    /// The vehicle whose topic it came on.
    pub vehicle: VehicleId,
    /// The ACK.
    pub ack: Ack,
    /// When it arrived.
    pub at: Timestamp,
}

impl Handler<AckIn> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: AckIn, ctx: &mut Context<Self>) {
        self.service(ctx);
        let engine = &mut self.engine;
        match guarded("taking an ACK", || engine.on_ack(msg.at, &msg.vehicle, &msg.ack)) {
            // Its record is an engine deadline (`ACK_RECORD_DELAY_MS`), armed with the others.
            Some(Ok(step)) => self.carry_out(step, ctx),
            Some(Err(ignored)) => self.refuse_ack(&msg, &ignored),
            None => ctx.stop(),
        }
    }
}

/// A vehicle's state changed (`None` = it left).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FleetUpdate {
    /// The vehicle.
    pub id: VehicleId,
    /// Its state, or `None` when it left.
    pub state: Option<Vehicle>,
}

impl Handler<FleetUpdate> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: FleetUpdate, ctx: &mut Context<Self>) {
        self.service(ctx);
        if let Some(w) = &mut self.warmup {
            w.last_state = tokio::time::Instant::now();
        }
        self.apply_state(msg.id, msg.state, ctx);
    }
}

impl DispatcherActor {
    fn apply_state(&mut self, id: VehicleId, state: Option<Vehicle>, ctx: &mut Context<Self>) {
        let engine = &mut self.engine;
        let Some((_, event)) = guarded("updating the fleet", || engine.on_state(now(), id, state)) else {
            ctx.stop();
            return;
        };
        if let Some(e) = event {
            self.record(vec![e], ctx);
        }
        self.capacity_dirty = true;
    }
}

/// One of the two broker connections went down or came back ([`Link`]). While either is
/// down no order reaches a vehicle or no answer comes back: ACK deadlines wait, and when both
/// are back every attempt that waited gets its whole window again and the retained capacity
/// is published again (a restarted broker may have lost it).
impl Handler<Link> for DispatcherActor {
    type Result = ();

    fn handle(&mut self, msg: Link, ctx: &mut Context<Self>) {
        self.service(ctx);
        match msg.side {
            Side::Inbound => self.links.0 = msg.up,
            Side::Outbound => self.links.1 = msg.up,
        }
        if !msg.up {
            self.link_lost.get_or_insert_with(now);
            self.arm_timer(ctx);
            return;
        }
        if !self.online() {
            return;
        }
        if let Some(lost_at) = self.link_lost.take() {
            // The orders queued meanwhile reach the broker now, and answers sent meanwhile
            // were lost with it: the time without a broker does not count against a vehicle.
            let at = now();
            tracing::info!(outage_ms = at.as_millis() - lost_at.as_millis(), "broker back: ACK windows start again");
            let step = self.engine.restart_windows(lost_at, at);
            self.carry_out(step, ctx);
        }
        self.last_capacity = None;
        self.capacity_dirty = true;
        self.publish_capacity();
    }
}

/// The capacity now (for tests and the demo).
#[derive(Message)]
#[rtype(result = "Capacity")]
pub struct GetCapacity;

impl Handler<GetCapacity> for DispatcherActor {
    type Result = MessageResult<GetCapacity>;

    fn handle(&mut self, _: GetCapacity, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.engine.capacity(now()))
    }
}

/// Graceful shutdown: settle everything in flight (unanswered orders cancelled), then wait
/// until the log is durable and the cancels are with the MQTT client. Answers with the
/// number of dispatches it settled.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

impl Handler<Shutdown> for DispatcherActor {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        // Signals held back at start-up are answered, not dropped.
        for msg in self.warmup.take().map(|w| w.held).unwrap_or_default() {
            let why = format!("signal `{}` was not dispatched: the gateway stopped while starting", msg.signal.id);
            self.refuse_signal(&msg.signal, msg.at, &why, "stopped");
        }
        self.stopping = true;
        let engine = &mut self.engine;
        let steps = guarded("shutting down", || engine.shutdown(now(), "gateway shutdown")).unwrap_or_default();
        let settled = steps.len();
        for step in steps {
            self.carry_out(step, ctx);
        }
        let flushed = self.store.flush();
        Box::pin(
            async move {
                let _ = flushed.await;
                tokio::task::yield_now().await;
            }
            .into_actor(self)
            .then(|_, act, ctx| {
                // Everything is durable now: publish what waits for it, then wait until
                // it is with the client.
                act.service(ctx);
                let publisher = act.publisher.clone();
                async move { publisher.flush().await }.into_actor(act)
            })
            .map(move |_, _, _| settled),
        )
    }
}

/// How many dispatches have completed (their outcome published).
#[derive(Message)]
#[rtype(result = "u64")]
pub struct Completed;

impl Handler<Completed> for DispatcherActor {
    type Result = u64;

    fn handle(&mut self, _: Completed, _ctx: &mut Context<Self>) -> u64 {
        self.completed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use gridweaver_core::allocation::filter::SimpleVehicleFilter;
    use gridweaver_core::allocation::SmartDispatcher;
    use gridweaver_core::dispatch::{EngineConfig, Planner};
    use gridweaver_core::model::{Direction, FallbackKind, SignalType};
    use gridweaver_core::wire::Topics;
    use rumqttc::{AsyncClient, MqttOptions};

    use super::*;
    use crate::store::{self, Query, Reader, StoreError};

    fn events(db: &std::path::Path, kind: EventKind) -> Vec<gridweaver_core::events::StoredEvent> {
        let mut out = Vec::new();
        Reader::open(db)
            .unwrap()
            .for_each(&Query { kind: Some(kind), ..Query::default() }, |e| {
                out.push(e);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        out
    }

    /// A dispatcher logging to `dir/log.db`, with an ACK timeout of `ack_timeout_ms`, no
    /// fallback, one vehicle ("mute") that nobody answers for and the bridge's subscription
    /// acknowledged (the start-up hold ends once its time has passed).
    async fn with_a_silent_vehicle(
        dir: &std::path::Path,
        ack_timeout_ms: i64,
    ) -> (std::path::PathBuf, StoreHandle, Addr<DispatcherActor>) {
        let db = dir.join("log.db");
        let (store, _join) = StoreHandle::start(store::open_writer(&db, false).unwrap()).unwrap();
        let (client, _eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 9), 10_000);
        let publisher = Publisher::new(client, Arc::new(Topics::new("t")));
        let rebuild: EngineFactory = Box::new(move || {
            let cfg = EngineConfig { ack_timeout_ms, fallback: FallbackKind::Noop, ..EngineConfig::default() };
            let planner = Planner::new(cfg, Box::new(SimpleVehicleFilter), Box::new(SmartDispatcher::default()));
            (Engine::new(planner), Step::default())
        });
        let dispatcher = DispatcherActor::new(rebuild, store.clone(), publisher).start();
        let v = Vehicle::new("mute", 0.8, 60.0, 11.0);
        dispatcher.send(FleetUpdate { id: v.id.clone(), state: Some(v) }).await.unwrap();
        dispatcher.send(Subscribed).await.unwrap();
        (db, store, dispatcher)
    }

    /// actix runs an actor's timers and futures only once its mailbox is empty. Under a
    /// stream of messages that never lets it empty (a flood), a decided order still goes
    /// out and its ACK deadline still expires: the silent vehicle's order is cancelled and
    /// the dispatch completed while the flood goes on, not after it.
    #[actix_rt::test]
    async fn deadlines_expire_and_steps_are_published_while_a_flood_keeps_the_mailbox_full() {
        let dir = tempfile::tempdir().unwrap();
        let (db, store, dispatcher) = with_a_silent_vehicle(dir.path(), 100).await;
        tokio::time::sleep(FLEET_SETTLE_MIN + FLEET_QUIET * 3).await;

        let signal = Signal::new("s", SignalType::Afrr, Direction::Up, 5.0, now());
        dispatcher.send(SignalIn { signal, at: now() }).await.unwrap();
        // From another thread, faster than the dispatcher takes them, for 1.5 s: another
        // vehicle's changing state (do_send: past the mailbox's bound, so it never empties).
        let addr = dispatcher.clone();
        let flood = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut i = 0u64;
            while started.elapsed() < Duration::from_millis(1_500) {
                let v = Vehicle::new("chatty", 0.5 + (i % 40) as f64 / 100.0, 60.0, 11.0);
                addr.do_send(FleetUpdate { id: v.id.clone(), state: Some(v) });
                i += 1;
                if i.is_multiple_of(32) {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            now()
        });
        // This thread is the dispatcher's too: it must not block while the flood goes on.
        while !flood.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let flood_ended = flood.join().unwrap();
        store.flush().await.unwrap();
        let cancelled = events(&db, EventKind::OrderCancelled);
        let completed = events(&db, EventKind::DispatchCompleted);
        assert_eq!((cancelled.len(), completed.len()), (1, 1));
        assert!(
            completed[0].ts_ms + 500 < flood_ended.as_millis(),
            "the dispatch completed {} ms after the flood ended, not while it went on",
            completed[0].ts_ms - flood_ended.as_millis()
        );
        assert_eq!(dispatcher.send(Completed).await.unwrap(), 1, "its outcome was published");
    }

    /// A store that cannot write while 20,000 vehicles join (more rows than its queue
    /// holds): the dispatcher never blocks the thread (this test runs on it, and goes on),
    /// the queue stays within its bound, and once the store writes again every row is there,
    /// in the order decided.
    #[actix_rt::test]
    async fn a_full_store_pauses_the_dispatcher_without_blocking_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (db, store, dispatcher) = with_a_silent_vehicle(dir.path(), 1_000).await;
        store.flush().await.unwrap();
        let blocker = rusqlite::Connection::open(&db).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let n = store::QUEUE_EVENTS + 3_616;
        for i in 0..n {
            let v = Vehicle::new(format!("v{i:05}"), 0.5, 60.0, 11.0);
            dispatcher.do_send(FleetUpdate { id: v.id.clone(), state: Some(v) });
        }
        let started = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(started.elapsed() < Duration::from_secs(5), "the thread was held");
        let backlog = store.backlog();
        assert!(backlog.events <= store::QUEUE_EVENTS, "{backlog:?}");
        blocker.execute_batch("ROLLBACK").unwrap();
        // Everything waiting reaches the store, then is written.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while events(&db, EventKind::VehicleDiscovered).len() < n + 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let joined: Vec<String> = events(&db, EventKind::VehicleDiscovered)
            .iter()
            .filter_map(|e| e.actor.strip_prefix("vehicle/v").map(str::to_owned))
            .collect();
        assert_eq!(joined.len(), n, "every vehicle's row is in the log");
        assert!(joined.windows(2).all(|w| w[0] < w[1]), "in the order decided");
        assert_eq!(dispatcher.send(Completed).await.unwrap(), 0, "the dispatcher answers");
    }

    /// On tokio's paused clock: a silent vehicle's order is cancelled when its ACK window,
    /// counted from the publish, has passed; no real time is spent waiting for it.
    #[actix_rt::test]
    async fn an_unanswered_order_is_cancelled_when_its_window_passes_on_virtual_time() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let (db, store, dispatcher) = with_a_silent_vehicle(dir.path(), 30_000).await;
        // The start-up hold ends (virtual time).
        tokio::time::sleep(FLEET_SETTLE_MAX).await;
        let signal = Signal::new("s", SignalType::Afrr, Direction::Up, 5.0, now());
        dispatcher.send(SignalIn { signal, at: now() }).await.unwrap();
        // Let the store commit the plan in real time while virtual time stands still (a task
        // that keeps yielding keeps the paused clock from jumping ahead), and the dispatcher
        // publish the order.
        let real = std::time::Instant::now();
        while events(&db, EventKind::OrderSent).is_empty() && real.elapsed() < Duration::from_secs(10) {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        // Now virtual time runs on; 40 s of it pass in no time.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        store.flush().await.unwrap();
        let sent = events(&db, EventKind::OrderSent);
        let cancelled = events(&db, EventKind::OrderCancelled);
        assert_eq!((sent.len(), cancelled.len()), (1, 1));
        assert_eq!(cancelled[0].payload["order_id"], sent[0].payload["order_id"]);
        let waited = cancelled[0].ts_ms - sent[0].ts_ms;
        assert!((30_000..=30_250).contains(&waited), "cancelled {waited} ms after the order, for a 30 s window");
        assert_eq!(events(&db, EventKind::DispatchCompleted).len(), 1);
    }
}
