//! Embedded MQTT broker for `gridweaver demo` (and tests and benchmarks).
//!
//! Owns: one [rumqttd](https://docs.rs/rumqttd) 0.20 broker, configured in code (no config file), serving
//! MQTT 3.1.1 without TLS on `127.0.0.1:<free port>`, running on background threads that rumqttd creates.
//! Accepts: any anonymous client on loopback. Emits: nothing of its own; it only routes messages.
//!
//! [`start_embedded_broker`] returns once the broker answers a real MQTT `CONNECT` with a `CONNACK`, so callers
//! can connect straight away.
//!
//! # Lifetime
//! rumqttd has no shutdown API: dropping [`EmbeddedBroker`] does **not** stop the broker; its threads keep
//! running until the process exits. That is what the demo wants (it exits when it is done). Tests that start
//! several brokers just get several ports.
//!
//! # Logging
//! rumqttd logs through `tracing`, and logs ordinary disconnects at `error` level. This module installs no
//! subscriber; a binary that installs one should silence the broker with an `EnvFilter` directive such as
//! `rumqttd=off` (or `rumqttd=warn`).
//!
//! # Limits worth knowing (rumqttd 0.20)
//! - The broker keeps at most 100 unacknowledged QoS 1 messages in flight per subscriber (a constant in
//!   rumqttd, not configurable). More are not dropped: they wait in the broker's log and flow as PUBACKs arrive.
//! - When a client subscribes, the retained messages it is sent are truncated to the free in-flight slots:
//!   at QoS 1 at most 100 retained messages reach a new subscriber, the rest are silently dropped. At QoS 0 the
//!   limit is `router.max_outgoing_packet_count` (set high here). Subscribe to retained vehicle states at QoS 0
//!   when the fleet can exceed 100 vehicles on this broker.
//! - rumqttd does not set `TCP_NODELAY` on the sockets it accepts.
//! - `dynamic_filters` must be on: without it rumqttd disconnects a client that publishes to a topic nobody
//!   subscribes to.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// How long [`start_embedded_broker`] waits for the broker to answer before giving up.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times a fresh port is tried when the chosen one was taken between probing and binding.
const PORT_ATTEMPTS: usize = 3;

/// Largest MQTT packet the broker accepts (bytes). Above the contract's 64 KiB payload limit on purpose, so an
/// oversized payload reaches the controller, which answers it on `<p>/errors` instead of the broker silently
/// dropping the publisher's connection.
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// Most client connections the broker accepts at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// A running embedded broker.
///
/// Dropping it does not stop the broker (rumqttd has no shutdown API); the broker's threads end with the process.
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// TCP port on `127.0.0.1` where the broker serves MQTT 3.1.1 (no TLS, anonymous).
    pub port: u16,
    /// The thread that runs `rumqttd::Broker::start` (kept only so the handle is not lost; never joined).
    _thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Host to connect to: always the loopback address `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Socket address of the broker (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }
}

/// Starts an embedded MQTT broker on a free loopback port and waits until it answers MQTT.
///
/// Picks a free port (binds `127.0.0.1:0`, reads the port, releases it), builds the configuration with
/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A socket or thread operation failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        error: std::io::Error,
    },
    /// The broker's thread ended while starting.
    #[error("the embedded MQTT broker on 127.0.0.1:{port} exited during start-up (port taken?): {last}")]
    Exited {
        /// Its port.
        port: u16,
        /// The last handshake error.
        last: String,
    },
    /// It never answered a handshake.
    #[error("the embedded MQTT broker on 127.0.0.1:{port} did not answer within {timeout:?}: {last}")]
    Timeout {
        /// Its port.
        port: u16,
        /// How long it was given.
        timeout: Duration,
        /// The last handshake error.
        last: String,
    },
    /// It answered CONNECT with something else than a CONNACK.
    #[error("unexpected answer to CONNECT: {0:02x?}")]
    BadConnack([u8; 4]),
    /// It refused the probe's CONNECT.
    #[error("CONNECT refused with return code {0}")]
    Refused(u8),
    /// No attempt was made.
    #[error("no answer yet")]
    NotYet,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> BrokerError {
    move |error| BrokerError::Io { what, error }
}

/// [`broker_config`], runs the broker on a background thread, and returns once an MQTT `CONNECT` to the port
/// is answered with a `CONNACK`. If the port was taken in the meantime, another one is tried (up to 3 times).
///
/// # Errors
/// No free port, the thread could not be spawned, or the broker did not answer within 5 seconds.
pub fn start_embedded_broker() -> Result<EmbeddedBroker, BrokerError> {
    let mut last_error = BrokerError::NotYet;
    for _ in 0..PORT_ATTEMPTS {
        let port = free_loopback_port()?;
        let config = broker_config(port);
        let thread = std::thread::Builder::new()
            .name("gridweaver-broker".to_owned())
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(error) = broker.start() {
                    tracing::error!(%error, "embedded MQTT broker stopped");
                }
            })
            .map_err(io("could not spawn the embedded MQTT broker thread"))?;
        match wait_until_serving(port, &thread, READY_TIMEOUT) {
            Ok(()) => return Ok(EmbeddedBroker { port, _thread: thread }),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// The rumqttd configuration used by [`start_embedded_broker`]: one MQTT 3.1.1 server on `127.0.0.1:<port>`.
///
/// No TLS, no authentication, no websocket, cluster, bridge, metrics, Prometheus or console servers.
/// Limits: [`MAX_CONNECTIONS`] connections, [`MAX_PACKET_BYTES`] packets, up to 10,000 QoS 0 messages per read
/// of a subscriber's queue, 16 MiB x 8 log segments per subscription filter (a backlog of about 600,000
/// orders), dynamic filters on, and a 10 s limit for a new connection to send its `CONNECT`.
pub fn broker_config(port: u16) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PACKET_BYTES,
        // Packets read from one connection in one batch (not an in-flight limit).
        max_inflight_count: 4096,
        auth: None,
        external_auth: None,
        // Required: without it a publish to a topic that nobody subscribes to disconnects the publisher.
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "gridweaver-embedded-v4".to_owned(),
        listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let router = RouterConfig {
        max_connections: MAX_CONNECTIONS,
        // QoS 0 messages (and retained messages for QoS 0 subscriptions) sent per read of a subscriber's queue.
        max_outgoing_packet_count: 10_000,
        max_segment_size: 16 * 1024 * 1024,
        max_segment_count: 8,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

/// Returns a loopback port that was free a moment ago (bind to port 0, read the port, release it).
fn free_loopback_port() -> Result<u16, BrokerError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("no free TCP port on 127.0.0.1"))?;
    let port = listener.local_addr().map_err(io("could not read the port of a loopback listener"))?.port();
    drop(listener);
    Ok(port)
}

/// Polls the broker with an MQTT handshake until it answers, its thread ends, or `timeout` passes.
fn wait_until_serving(port: u16, thread: &JoinHandle<()>, timeout: Duration) -> Result<(), BrokerError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match mqtt_handshake(port) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if thread.is_finished() {
            return Err(BrokerError::Exited { port, last: last_error.to_string() });
        }
        if Instant::now() >= deadline {
            return Err(BrokerError::Timeout { port, timeout, last: last_error.to_string() });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One MQTT 3.1.1 `CONNECT` (clean session, client id `gridweaver-probe`) -> `CONNACK` accepted -> `DISCONNECT`.
///
/// A bare TCP connect would succeed as soon as the port is bound, before the router runs, and rumqttd logs an
/// error for every connection that closes without sending `CONNECT`.
fn mqtt_handshake(port: u16) -> Result<(), BrokerError> {
    const CLIENT_ID: &[u8] = b"gridweaver-probe";
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(io("TCP connect failed"))?;
    stream.set_read_timeout(Some(Duration::from_millis(1000))).map_err(io("set_read_timeout"))?;
    stream.set_write_timeout(Some(Duration::from_millis(1000))).map_err(io("set_write_timeout"))?;
    stream.set_nodelay(true).map_err(io("set_nodelay"))?;

    // Variable header: protocol name "MQTT", level 4, flags 0x02 (clean session), keep-alive 10 s.
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x0A];
    body.extend_from_slice(&[0x00, CLIENT_ID.len() as u8]);
    body.extend_from_slice(CLIENT_ID);
    let mut packet = vec![0x10, body.len() as u8]; // body is < 128 bytes: a one-byte remaining length
    packet.extend_from_slice(&body);
    stream.write_all(&packet).map_err(io("sending CONNECT failed"))?;

    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).map_err(io("no CONNACK"))?;
    if connack[0] != 0x20 || connack[1] != 0x02 {
        return Err(BrokerError::BadConnack(connack));
    }
    if connack[3] != 0x00 {
        return Err(BrokerError::Refused(connack[3]));
    }
    // Best effort: the handshake already succeeded.
    let _ = stream.write_all(&[0xE0, 0x00]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_one_loopback_v4_server_and_no_extras() {
        let config = broker_config(18830);
        let servers = config.v4.as_ref().map(|v4| v4.values().map(|s| s.listen).collect::<Vec<_>>());
        assert_eq!(servers, Some(vec!["127.0.0.1:18830".parse().unwrap()]));
        assert!(config.v5.is_none() && config.ws.is_none());
        assert!(config.prometheus.is_none() && config.metrics.is_none() && config.console.is_none());
        assert!(config.router.max_connections >= 100);
    }

    #[test]
    fn starts_and_answers_mqtt() {
        let broker = start_embedded_broker().unwrap();
        assert_ne!(broker.port, 0);
        mqtt_handshake(broker.port).unwrap();
        // A second broker gets its own port.
        let other = start_embedded_broker().unwrap();
        assert_ne!(other.port, broker.port);
    }
}
