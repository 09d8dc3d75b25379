//! What the gateway's two MQTT connections share: polling an event loop with reconnection
//! backoff, knowing whether the link is up, and ending cleanly after our DISCONNECT (the
//! broker closes the connection first, so nothing it still writes to us is cut off).

use std::time::Duration;

use rumqttc::{ConnectionError, Event, EventLoop, Incoming, Outgoing};
use tokio::time::Instant;

/// How long a clean disconnect waits for the broker: for the PUBACKs of what was published
/// before it, and then for the broker to close the connection.
pub const DISCONNECT_WAIT: Duration = Duration::from_secs(3);

/// What a poll of [`Connection::next`] gave.
pub enum Polled {
    /// An event of the connection (a `ConnAck` has already marked it up).
    Event(Event),
    /// The connection came up (`true`) or was lost (`false`).
    Link(bool),
    /// The broker could not be reached (again); the backoff has been waited.
    Unreachable,
    /// Our DISCONNECT went out and the broker has closed the connection (or did not within
    /// [`DISCONNECT_WAIT`]): the loop ends.
    Closed,
}

/// One MQTT connection's event loop, with the state its poll loop keeps.
pub struct Connection {
    eventloop: EventLoop,
    /// Which connection, for the log.
    name: &'static str,
    backoff: Duration,
    reconnect_max: Duration,
    up: bool,
    leaving: Option<Instant>,
}

impl Connection {
    /// A connection over `eventloop`, retried with a backoff doubling up to `reconnect_max`.
    pub fn new(eventloop: EventLoop, name: &'static str, reconnect_max: Duration) -> Self {
        Self { eventloop, name, backoff: Duration::from_millis(100), reconnect_max, up: false, leaving: None }
    }

    /// The next thing that happened. After an error it waits the backoff (the next poll
    /// connects again); it never waits for anything but the connection.
    pub async fn next(&mut self) -> Polled {
        if let Some(since) = self.leaving {
            loop {
                let left = DISCONNECT_WAIT.saturating_sub(since.elapsed());
                match tokio::time::timeout(left, self.eventloop.poll()).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(_)) => tracing::info!(connection = self.name, "disconnected from the MQTT broker"),
                    Err(_) => tracing::warn!(
                        connection = self.name,
                        "the broker did not close the connection after our DISCONNECT"
                    ),
                }
                return Polled::Closed;
            }
        }
        match self.eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                tracing::info!(
                    connection = self.name,
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                self.up = true;
                self.backoff = Duration::from_millis(100);
                Polled::Link(true)
            }
            Ok(event) => {
                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                    self.leaving = Some(Instant::now());
                }
                Polled::Event(event)
            }
            Err(e) => self.lost(e).await,
        }
    }

    async fn lost(&mut self, e: ConnectionError) -> Polled {
        let was_up = std::mem::replace(&mut self.up, false);
        if was_up {
            tracing::warn!(connection = self.name, error = %e, "lost the MQTT broker; reconnecting");
        } else {
            let retry_in_ms = self.backoff.as_millis() as u64;
            tracing::warn!(connection = self.name, error = %e, retry_in_ms, "cannot reach the MQTT broker");
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(self.reconnect_max);
        if was_up {
            Polled::Link(false)
        } else {
            Polled::Unreachable
        }
    }

    /// Whether the connection is up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Drops the connection (what was not acknowledged is sent again on the next one): the
    /// next poll connects again.
    pub fn remake(&mut self) {
        self.eventloop.clean();
        self.up = false;
    }
}
