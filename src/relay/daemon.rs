//! Starting and running the relay: bind the sockets, build the [`Context`], and spawn the
//! long-lived tasks (SMTP accept loop, SIP dispatch, scheduler, control socket, key
//! watch, and the metrics endpoint when configured).

use super::agent::AgentCommand;
use super::context::{Context, Listeners, PeerTrust, PendingTable, SipState};
use super::dispatch;
use super::error::{RelayError, io_err};
use super::events::{Events, Hooks, RelayEvent, Shutdown};
use super::jobs::Lane;
use super::keys::{KeyState, Keys};
use super::outbox;
use super::scheduler::{self, LaneCounts, MailQueue, QueueSnapshot};
use super::settings::{InForce, Live, Settings, peer_addresses};
use super::{caller, control, health, inbound, keywatch, local, reload, trust};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::queue::{Route, Spool};
use crate::sip::limits::PendingCalls;
use crate::sip::{Endpoint, EndpointConfig};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// A started relay.
pub struct Running {
    pub smtp_addr: SocketAddr,
    pub sip_addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`[metrics]`), if on.
    pub metrics_addr: Option<SocketAddr>,
    ctx: Arc<Context>,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    pub fn events(&self) -> broadcast::Receiver<RelayEvent> {
        self.ctx.events.subscribe()
    }

    pub fn queue_snapshot(&self) -> QueueSnapshot {
        self.ctx.queue.snapshot()
    }

    /// The metrics in Prometheus text form, as `/metrics` serves them.
    pub fn metrics_text(&self) -> String {
        self.ctx.metrics.scrape(|_| {}).unwrap_or_default()
    }

    /// The IDs of every queued message, oldest first.
    pub fn queue_snapshot_ids(&self) -> Vec<String> {
        self.ctx.queue.list().into_iter().map(|e| e.id).collect()
    }

    /// Read the config file and the keyring again, as SIGHUP does (see `reload`): Ok with
    /// what is in force now, or Err with why the reload was refused (the old config stays).
    pub async fn reload(&self) -> Result<String, String> {
        reload::reload(&self.ctx).await
    }

    /// Wait until every task has finished (after shutdown was triggered).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        self.ctx.sip.endpoint.shutdown().await;
        tracing::info!(domain = %self.ctx.settings().site.domain, "relay stopped");
    }
}

/// Bind everything and start the tasks.
pub async fn start(cfg: Config, shutdown: Shutdown, hooks: Hooks) -> Result<Running, RelayError> {
    start_with_agent(cfg, shutdown, hooks, None).await
}

/// [`start`], with SMTP hand-offs made by a hand-off agent started with `agent` (see
/// `agent`): what `sipmail run` does.
pub async fn start_with_agent(
    cfg: Config,
    shutdown: Shutdown,
    hooks: Hooks,
    agent: Option<AgentCommand>,
) -> Result<Running, RelayError> {
    let keys = KeyState::load(&cfg, None)?;
    // Claim the spool first: recovery must never run under another daemon's feet.
    std::fs::create_dir_all(&cfg.spool)
        .map_err(io_err(format!("creating spool {}", cfg.spool.display())))?;
    let control = control::bind(&cfg.spool).await.map_err(io_err(format!(
        "{}: relay.spool {}",
        cfg.file,
        cfg.spool.display()
    )))?;
    control::write_keyring_pointer(&cfg.keyring, &cfg.spool);
    let crate::queue::Recovered {
        spool,
        envelopes,
        handed,
        interrupted,
    } = Spool::recover(&cfg.spool)
        .map_err(io_err(format!("opening spool {}", cfg.spool.display())))?;
    if let Some(fault) = &hooks.spool_dir_sync {
        spool.set_dir_sync_fault(fault.clone());
    }
    let started = std::time::Instant::now();
    match spool.make_spares(cfg.queue.spare_files) {
        Ok(0) => {}
        Ok(made) => tracing::info!(
            files = made,
            ms = started.elapsed().as_millis() as u64,
            "spool: made spare files in free/ for the first messages (once in a spool's life: free/ is kept across restarts)"
        ),
        Err(e) => tracing::warn!(error = %e,
            "spool: cannot make spare files in free/; new messages create their files instead"),
    }
    let receipts =
        super::receipts::Receipts::open(&cfg.spool, cfg.queue.dedup_window).map_err(io_err(
            format!("opening the receipt store in {}", cfg.spool.display()),
        ))?;
    // Before any delivery: a message committed with a receipt is remembered for duplicate
    // suppression even if the process died before it wrote the record.
    super::receipts::recover(&receipts, &keys, &cfg.domain, &envelopes)
        .map_err(io_err("recovering receipt records"))?;
    if let crate::config::Delivery::Maildir(m) = &cfg.delivery {
        crate::queue::maildir::ensure(m)
            .map_err(io_err(format!("creating Maildir {}", m.display())))?;
    }
    let smtp = crate::listen::tcp(cfg.smtp_listen).map_err(io_err(format!(
        "{}: smtp.listen {}",
        cfg.file, cfg.smtp_listen
    )))?;
    let smtp_addr = smtp.local_addr().map_err(io_err("smtp socket"))?;
    let peer_addrs = peer_addresses(&cfg).await;
    let mut trusted: Vec<IpAddr> = peer_addrs.values().flatten().copied().collect();
    trusted.sort();
    trusted.dedup();
    let limits = &cfg.sip_limits;
    let ep_cfg = EndpointConfig {
        max_message: limits.max_message_size,
        invite_rate: limits.invite_rate,
        invite_burst: limits.invite_burst,
        max_tcp_connections: limits.max_tcp_connections,
        max_tcp_per_source: limits.max_tcp_per_source,
        tcp_idle_timeout: limits.tcp_idle,
        tcp_message_timeout: limits.tcp_half_open,
        trusted: trusted.clone(),
        sent_by: cfg.advertise.map(|a| a.sip_addr(cfg.sip_listen)),
        ..EndpointConfig::default()
    };
    let pending = PendingTable {
        calls: PendingCalls::new(limits.max_pending_per_source, limits.max_pending_total)
            .with_exempt(trusted.iter().copied()),
        evict: HashMap::new(),
    };
    let (endpoint, incoming) = Endpoint::bind(cfg.sip_listen, ep_cfg)
        .await
        .map_err(io_err(format!(
            "{}: sip.listen {}",
            cfg.file, cfg.sip_listen
        )))?;
    let sip_addr = endpoint.local_addr();
    let metrics_listener = match &cfg.metrics {
        Some(m) => Some(
            tokio::net::TcpListener::bind(m.listen)
                .await
                .map_err(io_err(format!("{}: metrics.listen {}", cfg.file, m.listen)))?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(io_err("metrics socket"))?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new(cfg.peers.iter().map(|p| p.domain.clone())));
    let recovered = envelopes.len();
    // The settings a reload can change are shared (and swapped whole); each task gets the
    // rest of its part of the config as arguments. The whole config is kept for reloads.
    let settings = Settings::from_config(&cfg, peer_addrs, 0);
    let events = Events::new();
    let queue = Arc::new(MailQueue::new(
        spool.clone(),
        envelopes,
        cfg.queue.clone(),
        settings.site.clone(),
        events.clone(),
        metrics.clone(),
    ));
    let lanes = LaneCounts {
        local: cfg.local_lanes,
        per_peer: cfg.calls_per_peer,
        per_next_hop: cfg.routing.lanes,
    };
    let paths = control::Paths {
        spool: cfg.spool.clone(),
        keyring: cfg.keyring.clone(),
    };
    let delivery = cfg.delivery.clone();
    let spool_root = cfg.spool.clone();
    let ctx = Arc::new(Context {
        settings: Arc::new(Live::new(settings)),
        sip: SipState {
            endpoint,
            addr: cfg.advertise.map_or(sip_addr, |a| a.sip_addr(sip_addr)),
            dialogs: Mutex::new(HashMap::new()),
            pending: Mutex::new(pending),
            call_setup: Mutex::new(HashMap::new()),
            down: Mutex::new(Default::default()),
        },
        trust: PeerTrust {
            store: Arc::new({
                let store = trust::TrustStore::new(&cfg.spool);
                store.clear_tmp();
                store
            }),
            writes: Mutex::new(trust::WriteLimiter::default()),
        },
        keys: Arc::new(Keys::new(keys)),
        config: tokio::sync::Mutex::new(InForce::new(cfg)),
        spool,
        queue: queue.clone(),
        receipts: Arc::new(receipts),
        shutdown: shutdown.clone(),
        events,
        metrics,
        listeners: Arc::new(Listeners::default()),
        hooks,
        agent: agent.map(|a| Arc::new(super::agent::Agent::new(a, spool_root))),
    });
    replay_handed(&ctx, handed).await;
    // Calls the last process did not finish: each message goes to the same relay again.
    for i in interrupted {
        if let Some((job, outcomes)) = ctx.queue.interrupted_job(&i) {
            ctx.queue.commit(&job, &outcomes, None).await;
        }
    }
    tracing::info!(
        domain = %ctx.settings().site.domain,
        smtp = %smtp_addr,
        sip = %sip_addr,
        contact = %ctx.sip.addr,
        metrics = %metrics_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        fingerprint = %ctx.keys().own_fpr_hex,
        peers = ctx.settings().site.peers.len(),
        routes = %super::reload::describe_routing(&ctx.settings().site.routing),
        recovered,
        "relay started"
    );
    // The scheduler starts a route's lanes when it first has work for it. A caller lane
    // looks its peer up in the current settings for each call: one removed by a reload
    // (or before a restart) keeps its mail queued until added again or expired.
    let worker_ctx = ctx.clone();
    let spawn_lane = move |route: &Route, lane_no: usize, lane: Lane| -> scheduler::LaneTask {
        let ctx = worker_ctx.clone();
        match route {
            Route::Local => Box::pin(local::worker(ctx, delivery.clone().into(), lane)),
            Route::Peer(domain) => Box::pin(caller::worker(ctx, domain.clone(), lane_no, lane)),
            Route::Smtp(hop) => Box::pin(local::worker(
                ctx,
                local::Destination::Smtp(super::handoff::SmtpHop::NextHop(hop.clone())),
                lane,
            )),
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    let up = ctx.listeners.clone();
    let accept = inbound::accept_loop(ctx.clone(), smtp);
    tasks.spawn(async move { Listeners::run(&up.smtp, accept).await });
    let up = ctx.listeners.clone();
    let sip = dispatch::sip_loop(ctx.clone(), incoming);
    tasks.spawn(async move { Listeners::run(&up.sip, sip).await });
    tasks.spawn(keywatch::watch(ctx.clone()));
    tasks.spawn(outbox::run(ctx.clone()));
    if let Some(listener) = metrics_listener {
        let probe = Arc::new(health::Health {
            ctx: ctx.clone(),
            smtp: smtp_addr,
            sip: sip_addr,
        });
        let stop = shutdown.clone();
        tasks.spawn(crate::metrics::http::serve(
            listener,
            ctx.metrics.clone(),
            probe,
            async move { stop.wait().await },
        ));
    }
    tasks.spawn(scheduler::run(queue, lanes, shutdown, spawn_lane));
    tasks.spawn(control::serve(ctx.clone(), paths, control));
    Ok(Running {
        smtp_addr,
        sip_addr,
        metrics_addr,
        ctx,
        tasks,
    })
}

/// Run until shutdown. SIGHUP reloads the config and the keyring (see `reload`).
pub async fn run(
    cfg: Config,
    shutdown: Shutdown,
    agent: Option<AgentCommand>,
) -> Result<(), RelayError> {
    let running = start_with_agent(cfg, shutdown.clone(), Hooks::default(), agent).await?;
    let ctx = running.ctx.clone();
    let hup = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; reload with `sipmail reload` or a restart");
                return;
            }
        };
        loop {
            tokio::select! {
                r = hup.recv() => if r.is_none() { break },
                _ = shutdown.wait() => break,
            }
            tracing::info!("SIGHUP: reloading the config and the keyring");
            // A refusal is logged by the reload; the old config stays in force.
            let _ = reload::reload(&ctx).await;
        }
    });
    running.wait().await;
    hup.abort();
    Ok(())
}

/// Hand-offs the last process noted (the next hop had said yes) but did not live to
/// report: their outcome is committed now, and a partner's delivered receipt issued, as
/// the lane would have; the message is not handed over a second time.
async fn replay_handed(ctx: &Context, handed: Vec<crate::queue::Handed>) {
    for h in handed {
        let Some((job, outcomes)) = ctx.queue.handed_job(&h) else {
            continue;
        };
        tracing::warn!(queue_id = %job.id, route = %job.route, rcpts = ?h.delivered,
            "spool recovery: the next hop had accepted this message before sipmail stopped; recorded as delivered, not sent again");
        let handoffs: Vec<_> = h.handoffs.iter().map(local::handoff_of).collect();
        let issued = super::delivered::issue_for(ctx, &job, handoffs);
        ctx.queue.commit(&job, &outcomes, None).await;
        if let Some(peer) = issued {
            super::delivered::make_durable(ctx, &peer).await;
        }
    }
}
