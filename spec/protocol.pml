/* The outbox protocol of the profile service, for spin: one user's versions, the API's PUT and
 * DELETE, two workers, an operator's replay, the time that ends leases, the collector with its grace
 * period, reconciliation, and a reader. spec/README.md maps every step to its named query in
 * service/core/sql/queries.sql and says what is abstracted away.
 *
 * Properties (assertions, named in pan's message; EventuallyClean is the ltl formula below):
 *   ConsistentReads    a read that succeeds gets the bytes of the version it read the pointer of
 *   NoDanglingPointer  a live version's blob is in the bucket in every state, and a reader finds the
 *                      blob of the live pointer it read (the grace period covers reads in flight)
 *   NoResurrection     nothing at or below a tombstone goes live, or is read by a read begun after it
 *   MonotonicLive      the live pointer only moves forward
 *   FencedCompletion   only the holder of the current lease completes an intent
 *   NoOverwrite        an upload never overwrites the object of the live version's key
 *   DeadKeysStayDead   the holder of the current lease never uploads to a key scheduled for deletion
 *   SafeDeletion       a deletion is claimed only when no live or pending version needs the key
 *   EventuallyClean    []<> the bucket holds exactly the keys of live and pending versions
 *
 * Guards are on by default; a negative lane (spec/lanes/) switches one off with a #define:
 *   NO_FENCE           publish_intents does not compare the lease token
 *   NO_CREATE_ONLY     the upload overwrites an existing object (no If-None-Match: *)
 *   NO_FRESH_KEY       replay of a dead intent keeps the version's old, scheduled key
 *   SNAPSHOT_KEY       the claim returns the blob key of its statement snapshot, not of the locked row
 *   NO_KEY_GUARD       publish_intents does not check that the version still names the uploaded key
 *   NO_GRACE           the collector claims a deletion without waiting for the grace period
 *   GRACE_FROM_INSERT  the grace period starts inside the scheduling transaction, before it commits
 *   NO_RECHECK         claiming a deletion does not re-check that no live or pending version needs it
 *   LIVE_SNAPSHOT      publish_intents compares with the snapshot's live pointer, not the locked row's
 *   NO_TOMBSTONE_CHECK the versioned-image read ignores a tombstone above the version
 *   NO_RECONCILE       nobody lists the bucket
 *   USER_KEY           a version's blob key is derived from the user id alone
 * Size and scope: MAXV (2 or 3 versions); NO_OBSERVERS drops the reader and the monitor (they
 * change nothing the liveness property depends on, beyond delaying a grace period).
 * Statements marked @reach must all execute in the positive lanes (scripts/model-check checks it);
 * those marked @defence are second lines of defence, reported when they are never needed.
 */

#ifndef MAXV
#define MAXV 2          /* version numbers 1..MAXV: PUTs and DELETE tombstones (2 or 3) */
#endif
#define NK (MAXV + 1)   /* blob keys 1..NK: one per PUT, one more for a replay's fresh key */
#ifndef MAX_ATTEMPTS
#define MAX_ATTEMPTS 1  /* every lost lease is the final attempt: the next claim kills the intent */
#endif

/* versions.kind and versions.state */
#define K_PUT 1
#define K_DEL 2
#define V_PENDING 1
#define V_PUBLISHED 2
#define V_SUPERSEDED 3
#define V_FAILED 4
/* intents.state */
#define I_PENDING 1
#define I_PROGRESS 2
#define I_DONE 3
#define I_SUPERSEDED 4
#define I_DEAD 5
/* blob_deletions: SCHED and LEASED are both state 'scheduled' in the database */
#define D_NONE 0
#define D_SCHED 1       /* scheduled; its grace period runs from its first sighting */
#define D_LEASED 2      /* claimed by the collector (leased_until set), S3 delete not yet done */
#define D_DELETED 3
#define D_KEPT 4

/* Which properties are checked: all of them, unless a lane names one (-DONLY_ONE -DCHK_<name>=1). */
#ifdef ONLY_ONE
#define CHK_DEFAULT 0
#else
#define CHK_DEFAULT 1
#endif
#ifndef CHK_ConsistentReads
#define CHK_ConsistentReads CHK_DEFAULT
#endif
#ifndef CHK_NoDanglingPointer
#define CHK_NoDanglingPointer CHK_DEFAULT
#endif
#ifndef CHK_NoResurrection
#define CHK_NoResurrection CHK_DEFAULT
#endif
#ifndef CHK_MonotonicLive
#define CHK_MonotonicLive CHK_DEFAULT
#endif
#ifndef CHK_FencedCompletion
#define CHK_FencedCompletion CHK_DEFAULT
#endif
#ifndef CHK_NoOverwrite
#define CHK_NoOverwrite CHK_DEFAULT
#endif
#ifndef CHK_DeadKeysStayDead
#define CHK_DeadKeysStayDead CHK_DEFAULT
#endif
#ifndef CHK_SafeDeletion
#define CHK_SafeDeletion CHK_DEFAULT
#endif
/* Hidden: not part of the state vector. Their names appear in pan's "assertion violated" line. */
hidden byte ConsistentReads = CHK_ConsistentReads;
hidden byte NoDanglingPointer = CHK_NoDanglingPointer;
hidden byte NoResurrection = CHK_NoResurrection;
hidden byte MonotonicLive = CHK_MonotonicLive;
hidden byte FencedCompletion = CHK_FencedCompletion;
hidden byte NoOverwrite = CHK_NoOverwrite;
hidden byte DeadKeysStayDead = CHK_DeadKeysStayDead;
hidden byte SafeDeletion = CHK_SafeDeletion;
#define CHECK(p, c) assert(!p || (c))

/* profiles */
byte live;                  /* live_version: 0 = none */
byte newest;                /* newest_version */
bit deleted;
byte max_tomb;              /* the newest tombstone's version (derived from versions, kept for brevity) */
/* versions, by version number */
byte vkind[MAXV + 1];
byte vstate[MAXV + 1];
byte vkey[MAXV + 1];
/* intents, by version number (a tombstone has none) */
byte istate[MAXV + 1];
byte attempts[MAXV + 1];
byte holder[MAXV + 1];      /* lease_token: which worker's claim is current (0 = none) */
bit expired[MAXV + 1];      /* an in_progress intent whose lease ran out (next_attempt_at <= now()) */
/* blob_deletions, by key */
byte dstate[NK + 1];
bit dblock[NK + 1];         /* a read in flight when the grace period started: it must end first */
/* the bucket: bucket[k] is the version whose bytes key k holds, 0 if absent */
byte bucket[NK + 1];
byte nextkey;               /* new_blob_key: keys are never reused */
bit rbusy;                  /* the reader has read a pointer and not answered yet */

#define DUE(i) (istate[i] == I_PENDING || (istate[i] == I_PROGRESS && expired[i]))
#define LEASED_NOW(i) (istate[i] == I_PROGRESS && !expired[i])
#define NEEDS(v, k) (vkey[v] == k && (vstate[v] == V_PENDING || live == v))
#define SCHEDULED(k) (dstate[k] >= D_SCHED && dstate[k] <= D_LEASED)
#define LIVE_PUT (live != 0 && vkind[live] == K_PUT)
#define LIVE_KEY(k) (LIVE_PUT && vkey[live] == k)
#define EXISTS (newest > 0 && !deleted)
#define ORPHAN(k) (bucket[k] != 0 && !NEEDED(k) && !SCHEDULED(k))
#ifdef NO_GRACE
#define CLAIMABLE(k) (dstate[k] == D_SCHED)
#else
#define CLAIMABLE(k) (dstate[k] == D_SCHED && !dblock[k])   /* the grace period is over */
#endif
#ifdef NO_FENCE
#define FENCE(v, w) true
#else
#define FENCE(v, w) (holder[v] == w)
#endif
#ifdef NO_KEY_GUARD
#define KEY_GUARD(v, k) true
#else
#define KEY_GUARD(v, k) (vkey[v] == k && vstate[v] == V_PENDING)
#endif
#ifdef NO_TOMBSTONE_CHECK
#define BELOW_NO_TOMBSTONE(v) true
#else
#define BELOW_NO_TOMBSTONE(v) (v > max_tomb)
#endif
#define PUBLISHABLE(v, w, k) (istate[v] == I_PROGRESS && FENCE(v, w) && KEY_GUARD(v, k))
#define IS_LEASED(k) (dstate[k] == D_LEASED)
/* PICKV / PICKK: choose a version / a key for which C holds (blocks if there is none). */
#if MAXV == 2
#define PICKV(x, C) if :: C(1) -> x = 1 :: C(2) -> x = 2 fi
#define PICKK(x, C) if :: C(1) -> x = 1 :: C(2) -> x = 2 :: C(3) -> x = 3 fi
#define NEEDED(k) (NEEDS(1, k) || NEEDS(2, k))
#define ALL_KEYS(P) (P(1) && P(2) && P(3))
#define UNBLOCK dblock[1] = 0; dblock[2] = 0; dblock[3] = 0
#elif MAXV == 3
#define PICKV(x, C) if :: C(1) -> x = 1 :: C(2) -> x = 2 :: C(3) -> x = 3 fi
#define PICKK(x, C) if :: C(1) -> x = 1 :: C(2) -> x = 2 :: C(3) -> x = 3 :: C(4) -> x = 4 fi
#define NEEDED(k) (NEEDS(1, k) || NEEDS(2, k) || NEEDS(3, k))
#define ALL_KEYS(P) (P(1) && P(2) && P(3) && P(4))
#define UNBLOCK dblock[1] = 0; dblock[2] = 0; dblock[3] = 0; dblock[4] = 0
#else
#error MAXV must be 2 or 3
#endif

/* Eventual cleanliness: the bucket holds exactly the keys a live or pending version needs. */
#define CLEAN_KEY(k) ((bucket[k] != 0) == NEEDED(k))
#define CLEAN ALL_KEYS(CLEAN_KEY)
ltl EventuallyClean { [] <> CLEAN }

/* INSERT INTO blob_deletions ... ON CONFLICT (blob_key) DO NOTHING, by the triggers
 * retire_unpublished_blob and retire_replaced_blob (migrations/*_structure.sql) at the end of the
 * statement that frees the key, so in its transaction. The grace period is longer than any read, so it is over once every read that was in
 * flight when it started has answered: dblock records whether the reader was in flight then. It
 * starts when a collector first sees the row (seen_at), at the earliest when this commits, so blk
 * is rbusy at the commit (GRACE_FROM_INSERT: at the insert, before the commit). */
inline schedule(key, blk) {
  if
  :: dstate[key] == D_NONE -> dstate[key] = D_SCHED; dblock[key] = blk
  :: else -> skip
  fi
}

active proctype Api() {
  byte v;
  do
  :: newest < MAXV ->
       if
       :: atomic {   /* lock_profile_for_write + accept_put */
            newest++; v = newest;
            vkind[v] = K_PUT; vstate[v] = V_PENDING;
#ifdef USER_KEY
            nextkey = 1; vkey[v] = 1;   /* one key per user, whatever the version */
#else
            nextkey++; vkey[v] = nextkey;   /* new_blob_key(), committed before any upload */
#endif
            istate[v] = I_PENDING; deleted = 0;
            printf("MSC: api: PUT accepted as v%d, blob key K%d\n", v, vkey[v]);
            v = 0
          }
       :: EXISTS -> atomic {   /* lock_existing_profile + accept_delete */
            newest++; v = newest;
            vkind[v] = K_DEL; vstate[v] = V_PUBLISHED;
            if :: LIVE_PUT -> schedule(vkey[live], rbusy) :: else -> skip fi;
            CHECK(MonotonicLive, v > live);
            printf("MSC: api: DELETE publishes tombstone v%d (live was v%d)\n", v, live);
            live = v; deleted = 1; max_tomb = v; v = 0
          }
       fi
  :: else -> break
  od;
  skip   /* @reach api-end */
}

/* Each step is one statement of workers/outbox.py: a transaction, or one request to the store. */
#ifdef NO_CREATE_ONLY
#define CREATE_ONLY_REFUSES(k) false
#else
#define CREATE_ONLY_REFUSES(k) (bucket[k] != 0)   /* If-None-Match: * answers 412 */
#endif
#define RESET_WORKER v = 0; k = 0; sl = 0; sup = 0; blk = 0
proctype Worker(byte w) {
  byte v, k, sk, sl; bit sup, blk;
end_idle:
  atomic {   /* claim_intents: the due scan, as of the statement's snapshot */
    PICKV(v, DUE);
    sup = (live >= v);   /* the final SELECT's p.live_version: already_superseded */
#ifdef SNAPSHOT_KEY
    sk = vkey[v];
#endif
    printf("MSC: worker %d: claim statement starts, its snapshot shows v%d due (key K%d)\n", w, v, vkey[v])
  }
  atomic {   /* claim_intents: FOR UPDATE SKIP LOCKED re-checks the row as it is now */
    if
    :: DUE(v) && attempts[v] < MAX_ATTEMPTS ->
         istate[v] = I_PROGRESS; attempts[v]++; holder[v] = w; expired[v] = 0;
#ifdef SNAPSHOT_KEY
         k = sk;   /* the join with versions as of the snapshot */
#else
         k = vkey[v];   /* read from the row the claim holds locked */
#endif
         sk = 0;
         printf("MSC: worker %d: claims v%d (attempt %d), to upload to K%d; the version names K%d\n", w, v, attempts[v], k, vkey[v]);
         if :: sup -> goto publish :: else -> skip fi   /* @reach claim */
    :: DUE(v) && attempts[v] >= MAX_ATTEMPTS ->
         /* the final attempt lost its lease: the intent dies here (failed, retired) */
         istate[v] = I_DEAD; holder[v] = 0; expired[v] = 0; vstate[v] = V_FAILED;
         schedule(vkey[v], rbusy);
         printf("MSC: worker %d: v%d dies at claim (final attempt lost its lease); K%d scheduled\n", w, v, vkey[v]);
         sk = 0; RESET_WORKER; goto end_idle   /* @reach death-at-claim */
    :: else -> sk = 0; RESET_WORKER; goto end_idle
    fi
  }
  atomic {   /* the staged bytes (read by the claim) in hand: the worker goes on, or dies; stopping when
              * the intent has finished meanwhile is a behaviour the code no longer has, a subset of dying */
    if
    :: istate[v] == I_DONE || istate[v] == I_SUPERSEDED ->
         RESET_WORKER; goto end_idle   /* as if it died here (no longer taken by the code) */
    :: !(istate[v] == I_DONE || istate[v] == I_SUPERSEDED) -> skip
    :: printf("MSC: worker %d: dies holding v%d\n", w, v);   /* its lease will run out */
       RESET_WORKER; goto end_idle
    fi
  }
  atomic {   /* BlobStore.put_once, then its verification */
    CHECK(DeadKeysStayDead, holder[v] != w || dstate[k] == D_NONE);
    if
    :: CREATE_ONLY_REFUSES(k) ->
         printf("MSC: worker %d: upload of v%d to K%d: 412, the key holds v%d\n", w, v, k, bucket[k])
    :: else ->
         CHECK(NoOverwrite, bucket[k] == 0 || !LIVE_KEY(k));
         bucket[k] = v;   /* @reach upload */
         printf("MSC: worker %d: uploads v%d to K%d\n", w, v, k)
    fi;
    if
    :: bucket[k] != v -> RESET_WORKER; goto end_idle   /* @defence upload-verification */
    :: else -> skip
    fi
  }
publish:
#ifdef GRACE_FROM_INSERT
  atomic {   /* clock_timestamp() of the retired row, taken before the commit */
    blk = rbusy;
    printf("MSC: worker %d: publish of v%d inserts its deletion row; the grace period starts\n", w, v)
  }
#endif
#ifdef LIVE_SNAPSHOT
  atomic {   /* the profile CTE without FOR UPDATE: the snapshot's live_version */
    sl = live;
    printf("MSC: worker %d: publish of v%d starts, its snapshot shows v%d live\n", w, v, live)
  }
#endif
  atomic {   /* publish_intents */
    if
    :: PUBLISHABLE(v, w, k) ->
         CHECK(FencedCompletion, holder[v] == w);
#ifndef LIVE_SNAPSHOT
         sl = live;
#endif
#ifndef GRACE_FROM_INSERT
         blk = rbusy;
#endif
         if
         :: sl == 0 || v > sl ->
              CHECK(MonotonicLive, v > live);
              CHECK(NoResurrection, v > max_tomb);
              istate[v] = I_DONE; vstate[v] = V_PUBLISHED;
              if :: LIVE_PUT -> schedule(vkey[live], blk) :: else -> skip fi;
              printf("MSC: worker %d: publishes v%d live (key K%d; was v%d)\n", w, v, vkey[v], live);
              live = v   /* @reach publish-done */
         :: else ->
              istate[v] = I_SUPERSEDED; vstate[v] = V_SUPERSEDED;
              schedule(vkey[v], blk);   /* @reach publish-superseded */
              printf("MSC: worker %d: v%d superseded by v%d; K%d scheduled\n", w, v, live, vkey[v])
         fi;
         holder[v] = 0; expired[v] = 0
    :: else -> printf("MSC: worker %d: publish of v%d refused: lease lost\n", w, v)
    fi;
    RESET_WORKER; goto end_idle
  }
}

init {
  atomic { run Worker(1); run Worker(2) }
}

/* `profiles intents replay` of one intent, at any moment: lock_intent_for_replay, then
 * give_version_fresh_key (dead only) and replay_intent, in one transaction. A refused replay
 * (not found, leased, already pending, finished) changes nothing, so only those that go ahead
 * are modelled. */
#define REPLAYABLE(i) (istate[i] == I_DEAD || (istate[i] == I_PROGRESS && expired[i]))
active proctype Operator() {
  byte i;
end_operator:
  atomic {
    PICKV(i, REPLAYABLE);
    if
    :: istate[i] == I_DEAD ->
#ifndef NO_FRESH_KEY
         nextkey++; vkey[i] = nextkey;   /* the old key stays scheduled: dead for good */
#endif
         vstate[i] = V_PENDING;
         istate[i] = I_PENDING; attempts[i] = 0; holder[i] = 0;   /* @reach replay-dead */
         printf("MSC: operator: replays dead v%d, now pending with key K%d\n", i, vkey[i])
    :: else ->   /* stuck: in_progress with an expired lease; its key was never scheduled */
         istate[i] = I_PENDING; attempts[i] = 0; holder[i] = 0; expired[i] = 0;   /* @reach replay-stuck */
         printf("MSC: operator: replays stuck v%d\n", i)
    fi;
    i = 0
  }
}

/* Time: a lease runs out (its worker paused past it, or died). */
active proctype Clock() {
  byte i;
end_clock:
  do
  :: atomic {
       PICKV(i, LEASED_NOW);
       expired[i] = 1;   /* @reach lease-expiry */
       printf("MSC: clock: the lease on v%d runs out\n", i);
       i = 0
     }
  od
}

/* The collector: claims a deletion once its grace period is over, with the re-check
 * (claim_blob_deletions), then deletes from the bucket and finishes (finish_blob_deletion). */
active proctype Collector() {
  byte k;
end_collector:
  do
  :: atomic {
       PICKK(k, CLAIMABLE);
#ifndef NO_RECHECK
       if
       :: NEEDED(k) -> dstate[k] = D_KEPT   /* @defence recheck-kept */
       :: else ->
#endif
            CHECK(SafeDeletion, !NEEDED(k));
            dstate[k] = D_LEASED;   /* @reach gc-claim */
            printf("MSC: collector: claims the deletion of K%d\n", k);
#ifndef NO_RECHECK
       fi;
#endif
       k = 0
     }
  :: atomic {
       PICKK(k, IS_LEASED);
       bucket[k] = 0; dstate[k] = D_DELETED;   /* @reach gc-delete */
       printf("MSC: collector: deletes K%d from the bucket\n", k);
       k = 0
     }
  od
}

/* Reconciliation: key_pages + classify_blob_keys, then schedule_blob_deletion, two statements. */
#ifndef NO_RECONCILE
active proctype Reconciler() {
  byte k;
end_reconciler:
  do
  :: atomic { PICKK(k, ORPHAN) }
     atomic {
       if
       :: !SCHEDULED(k) ->   /* ON CONFLICT ... DO UPDATE ... WHERE state <> 'scheduled' */
            dstate[k] = D_SCHED; dblock[k] = rbusy;   /* @reach reconcile-schedule */
            printf("MSC: reconciler: K%d is in the bucket and needed by nobody: scheduled\n", k)
       :: else -> skip
       fi;
       k = 0
     }
  od
}
#endif

#ifndef NO_OBSERVERS
/* One read at any moment: GET /image (get_live_version, then the blob, the pointer re-read
 * once if the blob is missing) or GET /versions/{n}/image (get_published_version, then the blob).
 * A read that answers 404 at once touches nothing, so only reads that find a pointer are modelled. */
#define READABLE(n) (vkind[n] == K_PUT && vstate[n] == V_PUBLISHED && BELOW_NO_TOMBSTONE(n))
#define ANSWER rbusy = 0; UNBLOCK; rv = 0; rk = 0; t0 = 0; aslive = 0; versioned = 0
active proctype Reader() {
  byte rv, rk, t0; bit aslive, versioned;
end_reader:
  atomic {
    if
    :: LIVE_PUT -> rv = live
    :: PICKV(rv, READABLE); versioned = 1
    fi;
    rk = vkey[rv]; aslive = (live == rv); rbusy = 1; t0 = max_tomb;
    printf("MSC: reader: reads v%d (live: %d), key K%d\n", rv, aslive, rk)
  }
  atomic {
    if
    :: bucket[rk] != 0 ->
         CHECK(ConsistentReads, bucket[rk] == rv);
         CHECK(NoResurrection, rv > t0);
         printf("MSC: reader: K%d holds v%d: 200\n", rk, bucket[rk]);
         ANSWER; goto done   /* @reach read-200 */
    :: else ->
         printf("MSC: reader: K%d is not in the bucket\n", rk);
         CHECK(NoDanglingPointer, !aslive);
         if
         :: versioned -> ANSWER; goto done   /* @reach read-404-collected */
         :: else -> skip
         fi
    fi
  }
  atomic {   /* BlobNotFound: the pointer may just have moved; read it once more */
    if
    :: LIVE_PUT -> rv = live; rk = vkey[live]   /* @defence reader-re-read */
    :: else -> ANSWER; goto done
    fi
  }
  atomic {
    if
    :: bucket[rk] != 0 -> CHECK(ConsistentReads, bucket[rk] == rv)
    :: else -> CHECK(NoDanglingPointer, false)   /* 503 */
    fi;
    ANSWER
  }
done:
  skip   /* @reach reader-end */
}

/* A live version's blob is in the bucket, in every state. */
active proctype Monitor() {
end_monitor:
  atomic {
    !(!LIVE_PUT || bucket[vkey[live]] == live) ->
      printf("MSC: monitor: live v%d names K%d, which is not in the bucket\n", live, vkey[live]);
      CHECK(NoDanglingPointer, false)
  }
}
#endif
