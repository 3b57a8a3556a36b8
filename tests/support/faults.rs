//! Network faults between members: a TCP proxy in front of every member's
//! peer port. Members advertise the proxy's port; the proxy reads the peer
//! transport's handshake to learn which member dials which, so it can cut
//! every connection of an isolated member, both ways, and heal.
//! The handshake layout is keelson's (`src/peer.rs`): magic (8), version
//! (2), cluster id (8), from id (8), to id (8), crc (4).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HANDSHAKE_BYTES: usize = 38;

#[derive(Default)]
struct State {
    isolated: HashSet<u64>,
    conns: Vec<(u64, u64, tokio::task::AbortHandle)>,
}

#[derive(Clone, Default)]
pub struct PeerProxy {
    st: Arc<Mutex<State>>,
}

impl PeerProxy {
    /// Forwards a port members dial to `target` (a member's real peer
    /// port), and returns that port: `listen` when it can be bound, else
    /// another free port (a port found free can be taken before this binds
    /// it). Runs until the test's runtime ends.
    pub async fn forward(&self, listen: u16, target: u16) -> u16 {
        let mut port = listen;
        let mut tries = 0;
        let l = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => {
                    eprintln!("proxy: port {port} is taken, trying another");
                    tries += 1;
                    port = super::free_port();
                }
                Err(e) => panic!("proxy: cannot listen on 127.0.0.1:{port}: {e}"),
            }
        };
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = l.accept().await else {
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move { me.relay(inbound, target).await });
            }
        });
        port
    }

    async fn relay(&self, mut inbound: TcpStream, target: u16) {
        let mut hs = [0u8; HANDSHAKE_BYTES];
        if inbound.read_exact(&mut hs).await.is_err() {
            return;
        }
        let from = u64::from_le_bytes(hs[18..26].try_into().unwrap());
        let to = u64::from_le_bytes(hs[26..34].try_into().unwrap());
        if self.cut(from, to) {
            return;
        }
        let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
            return;
        };
        if outbound.write_all(&hs).await.is_err() {
            return;
        }
        let task = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
        let mut st = self.st.lock().unwrap();
        if st.isolated.contains(&from) || st.isolated.contains(&to) {
            task.abort();
            return;
        }
        st.conns.retain(|c| !c.2.is_finished());
        st.conns.push((from, to, task.abort_handle()));
    }

    fn cut(&self, from: u64, to: u64) -> bool {
        let st = self.st.lock().unwrap();
        st.isolated.contains(&from) || st.isolated.contains(&to)
    }

    /// Cuts member `id` off from every other member, both ways.
    pub fn isolate(&self, id: u64) {
        let mut st = self.st.lock().unwrap();
        st.isolated.insert(id);
        st.conns.retain(|(from, to, h)| {
            if *from == id || *to == id {
                h.abort();
                false
            } else {
                true
            }
        });
    }

    pub fn heal(&self) {
        self.st.lock().unwrap().isolated.clear();
    }
}
