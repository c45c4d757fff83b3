"""The Lua scripts of the Redis backend: every state change is one of them,
so it is atomic on the server, and each is safe to run twice (redis-py, or the
backend, sends a command again when its reply was lost).

``KEYS[1]`` is the key prefix, ``{name}:`` (a hash tag: every key of one
backend lands in one Redis Cluster slot); the other keys are made from it:

- ``j:<id>``: the job's hash (the :class:`~asyncbg.engine.records.JobRecord`
  fields, a missing one meaning None, ``seq`` its enqueue number, ``m`` its
  index member, ``rm`` its member of the ready set, ``sid`` its stream entry
  while a consumer holds it, ``tk`` the enqueue that took it, ``hb`` the
  owner that handed it back);
- ``r:<queue>``: the queue's pending jobs, scored by when they are due
  (``run_at``, else ``created_at``), member ``rm`` (a claim ticket then the
  id: ties go to the one queued first);
- ``q:<queue>``: the queue's stream and its consumer group ``g``; a claim
  moves due jobs from ``r:<queue>`` into it and reads them through the group,
  so the group's pending entries list is the set of jobs claimed, each under
  the consumer (node) that holds it; a renewal is ``XCLAIM … JUSTID`` to
  itself (a job taken by its own enqueue never enters the stream: its lease
  in ``l:<queue>`` is all there is of its hold);
- ``l:<queue>``: the running jobs, scored by their lease deadline (the
  server's ``TIME``);
- ``keys``: active idempotency key -> job id; ``n``: counts per queue and
  status; ``x``, ``x:<status>``, ``xt:<task>``, ``xt:<task>:<status>``: the
  jobs by ``created_at`` (member ``m``) for queries; ``fin``: final jobs by
  ``finished_at``; ``cr:<request>``: a claim's answer for a minute, so a
  claim sent again gets the same jobs;
- ``lk:<name>`` (``SET NX PX``, the owner and epoch), ``le:<name>`` (the
  ``INCR`` epoch), ``lr:<name>`` (the lease as last written, for the
  surfaces), ``ln`` (every schedule's name), ``sl:<name>`` (claimed slots),
  ``an:<name>`` (the anchor); ``nd:<id>`` and ``nds``: the nodes.
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE",
    "ANCHOR",
    "CANCEL",
    "CLAIM",
    "ENQUEUE",
    "EXPIRE",
    "FINISH",
    "FORGET_NODE",
    "HAND_BACK",
    "HEARTBEAT",
    "LEASES",
    "NODES",
    "PROGRESS",
    "QUERY",
    "RELEASE_LEASE",
    "RENEW",
    "RENEW_LEASE",
    "SLOT",
]

# What every script starts with.
_LIB = r"""
local P = KEYS[1]
local NULL = cjson.null
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
local function val(v) if v == NULL then return nil end return v end
local function jk(id) return P .. 'j:' .. id end
-- Set a hash field, or delete it for nil (a missing field is None).
local function put(key, name, value)
  if value then redis.call('HSET', key, name, value) else redis.call('HDEL', key, name) end
end
local function fields(key, names)
  local got = redis.call('HMGET', key, unpack(names))
  local out = {}
  for i, name in ipairs(names) do out[name] = got[i] or nil end
  return out
end
-- Move a job between statuses in the indexes and the counts (old or new may be nil).
local function moved(h, old, new)
  local created = h.created_at
  if old then
    redis.call('ZREM', P .. 'x:' .. old, h.m)
    redis.call('ZREM', P .. 'xt:' .. h.task .. ':' .. old, h.m)
    redis.call('HINCRBY', P .. 'n', h.queue .. '\0' .. old, -1)
  end
  if new then
    redis.call('ZADD', P .. 'x:' .. new, created, h.m)
    redis.call('ZADD', P .. 'xt:' .. h.task .. ':' .. new, created, h.m)
    redis.call('HINCRBY', P .. 'n', h.queue .. '\0' .. new, 1)
  end
end
-- Take the job out of its stream (acknowledged and deleted) and its lease set.
local function unheld(id, h)
  redis.call('ZREM', P .. 'l:' .. h.queue, id)
  if h.sid then
    local stream = P .. 'q:' .. h.queue
    redis.call('XACK', stream, 'g', h.sid)
    redis.call('XDEL', stream, h.sid)
    redis.call('HDEL', jk(id), 'sid')
  end
end
-- The job reached a final status at time t (its hash expires after ttl s),
-- with the fields of ``set`` (name, value, ...) written and those of ``del``
-- deleted in the same two commands.
local function ended(id, h, old, status, t, ttl, set, del)
  local key = jk(id)
  local s = {'status', status, 'finished_at', num(t)}
  for _, v in ipairs(set or {}) do s[#s + 1] = v end
  redis.call('HSET', key, unpack(s))
  local d = {'lease_until', 'rm'}
  for _, v in ipairs(del or {}) do d[#d + 1] = v end
  redis.call('HDEL', key, unpack(d))
  moved(h, old, status)
  if h.key and redis.call('HGET', P .. 'keys', h.key) == id then
    redis.call('HDEL', P .. 'keys', h.key)
  end
  redis.call('ZADD', P .. 'fin', t, cjson.encode({h.m, status, h.task, h.queue}))
  redis.call('PEXPIRE', key, math.floor(ttl * 1000))
end
-- A member of a ready set: a claim ticket (ties go to the one queued first), then the id.
local function ticket(id)
  return string.format('%016d', redis.call('INCR', P .. 'tickets')) .. id
end
-- Queue the job again (pending), due at ``due``.
local function queued(id, h, due)
  local rm = ticket(id)
  redis.call('HSET', jk(id), 'status', 'pending', 'rm', rm)
  redis.call('ZADD', P .. 'r:' .. h.queue, due, rm)
end
local HELD = {'status', 'owner', 'token', 'queue', 'task', 'm', 'sid', 'key',
  'created_at', 'cancel_requested', 'hb', 'run_at', 'attempts', 'max_attempts',
  'result_json', 'error'}
local function held(id, owner, token)
  local h = fields(jk(id), HELD)
  if h.status == 'running' and h.owner == owner and h.token == token then return h end
  return nil, h
end
"""

# ARGV: records (JSON list of {field: text}), limits (JSON {queue: n}), take
# owner ('' for none), take lease, taken ids (JSON list), request id, sender.
# Answers one entry per record: {'S'} stored as given, {'t', started_at,
# lease_until} stored taken (the server's times; the rest as sent), {'T',
# hash} taken by this same enqueue sent before, {'E', hash} an existing
# one, {'R'} refused.
ENQUEUE = (
    _LIB
    + r"""
local records = cjson.decode(ARGV[1])
local limits = cjson.decode(ARGV[2])
local owner, lease = ARGV[3], tonumber(ARGV[4])
local taken = {}
for _, id in ipairs(cjson.decode(ARGV[5])) do taken[id] = true end
local rid, sender = ARGV[6], ARGV[7]
local t = nil
local woke = false
local out = {}
for i, r in ipairs(records) do
  local id = r.id
  local key = val(r.key)
  local existing = nil
  if redis.call('EXISTS', jk(id)) == 1 then
    existing = id
  elseif key then
    existing = redis.call('HGET', P .. 'keys', key) or nil
  end
  if existing then
    local h = redis.call('HGETALL', jk(existing))
    local tk = redis.call('HGET', jk(existing), 'tk')
    if existing == id and taken[id] and tk == rid then
      out[i] = {'T', h}  -- this same enqueue, sent again: taken by it
    else
      out[i] = {'E', h}
    end
  else
    local limit = val(limits[r.queue])
    local pending = tonumber(redis.call('HGET', P .. 'n', r.queue .. '\0pending') or '0')
    if limit and pending >= tonumber(limit) then
      out[i] = {'R'}
    else
      local seq = redis.call('INCR', P .. 'seq')
      local m = string.format('%016d', seq) .. id
      local jkey = jk(id)
      local took = taken[id] and owner ~= ''
      if took then
        t = t or now()
        r.status, r.owner, r.token, r.attempts = 'running', owner, '1', '1'
        r.started_at, r.lease_until, r.tk = num(t), num(t + lease), rid
      end
      local flat = {'seq', tostring(seq), 'm', m}
      for name, value in pairs(r) do
        if value ~= NULL then
          flat[#flat + 1] = name
          flat[#flat + 1] = value
        end
      end
      redis.call('HSET', jkey, unpack(flat))
      local h = {queue = r.queue, task = r.task, m = m, created_at = r.created_at}
      redis.call('ZADD', P .. 'x', r.created_at, m)
      redis.call('ZADD', P .. 'xt:' .. r.task, r.created_at, m)
      if key then redis.call('HSET', P .. 'keys', key, id) end
      if took then
        redis.call('ZADD', P .. 'l:' .. r.queue, t + lease, id)
        moved(h, nil, 'running')
        out[i] = {'t', num(t), num(t + lease)}  -- the rest is as sent
      else
        moved(h, nil, 'pending')
        local rm = ticket(id)
        redis.call('HSET', jkey, 'rm', rm)
        redis.call('ZADD', P .. 'r:' .. r.queue, val(r.run_at) or r.created_at, rm)
        woke = true
        out[i] = {'S'}
      end
    end
  end
end
if woke then redis.call('PUBLISH', P .. 'work', sender) end
return out
"""
)

# ARGV: owner, limit, lease, request id, spent error format, then the queues.
# Answers {failed count, hash, hash, ...}: the jobs claimed, oldest due first.
CLAIM = (
    _LIB
    + r"""
local owner, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rid, spent = ARGV[4], ARGV[5]
local memo = P .. 'cr:' .. rid
local prior = redis.call('GET', memo)
if prior then
  local out = {0}
  for _, pair in ipairs(cjson.decode(prior)) do
    local h = held(pair[1], owner, pair[2])
    if h then out[#out + 1] = redis.call('HGETALL', jk(pair[1])) end
  end
  return out
end
local t = now()
local failed = 0
local ttl = tonumber(ARGV[6])
local candidates = {}
for qi = 7, #ARGV do
  local q = ARGV[qi]
  local lk = P .. 'l:' .. q
  local lapsed = redis.call('ZRANGEBYSCORE', lk, '-inf', num(t), 'WITHSCORES',
    'LIMIT', 0, limit + 1000)
  for i = 1, #lapsed, 2 do
    local id = lapsed[i]
    local h = fields(jk(id), HELD)
    if h.status ~= 'running' then
      redis.call('ZREM', lk, id)
    elseif tonumber(h.attempts) >= tonumber(h.max_attempts) then
      unheld(id, h)
      local why = string.format(spent, h.owner or '', h.attempts, h.max_attempts)
      ended(id, h, 'running', 'failed', t, ttl, {'error', why})
      failed = failed + 1
    else
      local seq = tonumber(string.sub(h.m, 1, 16))
      candidates[#candidates + 1] = {tonumber(lapsed[i + 1]), seq, id, q, h}
    end
  end
  local ready = redis.call('ZRANGEBYSCORE', P .. 'r:' .. q, '-inf', num(t), 'WITHSCORES',
    'LIMIT', 0, limit)
  for i = 1, #ready, 2 do
    local rm = ready[i]
    local seq = tonumber(string.sub(rm, 1, 16))
    candidates[#candidates + 1] = {tonumber(ready[i + 1]), seq, string.sub(rm, 17), q, nil, rm}
  end
end
table.sort(candidates, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
local out = {failed}
local memo_out = {}
local fresh = {}  -- queue -> ids moved into its stream
for i = 1, math.min(limit, #candidates) do
  local c = candidates[i]
  local id, q = c[3], c[4]
  local key = jk(id)
  if c[5] then
    local h = c[5]
    if h.sid then redis.call('XCLAIM', P .. 'q:' .. q, 'g', owner, 0, h.sid, 'JUSTID') end
  else
    redis.call('ZREM', P .. 'r:' .. q, c[6])
    local h = fields(key, HELD)
    moved(h, 'pending', 'running')
    local stream = P .. 'q:' .. q
    if not fresh[q] then
      fresh[q] = {}
      if redis.call('EXISTS', stream) == 0 then
        redis.call('XGROUP', 'CREATE', stream, 'g', '0', 'MKSTREAM')
      end
    end
    redis.call('XADD', stream, '*', 'id', id)
    table.insert(fresh[q], id)
    redis.call('HDEL', key, 'rm')
  end
  local token = redis.call('HINCRBY', key, 'token', 1)
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'status', 'running', 'owner', owner, 'started_at', num(t),
    'lease_until', num(t + lease))
  redis.call('HDEL', key, 'hb', 'tk')
  redis.call('ZADD', P .. 'l:' .. q, t + lease, id)
  memo_out[#memo_out + 1] = {id, tostring(token)}
end
-- Read what was just added through the group: the entries become this
-- consumer's pending ones (anything else found there is left over: dropped).
for q, ids in pairs(fresh) do
  local stream = P .. 'q:' .. q
  local want = {}
  for _, id in ipairs(ids) do want[id] = true end
  local got = redis.call('XREADGROUP', 'GROUP', 'g', owner, 'COUNT', #ids + 100,
    'STREAMS', stream, '>')
  if got then
    for _, entry in ipairs(got[1][2]) do
      local sid, body = entry[1], entry[2]
      local id = body[2]
      if want[id] then
        redis.call('HSET', jk(id), 'sid', sid)
      else
        redis.call('XACK', stream, 'g', sid)
        redis.call('XDEL', stream, sid)
      end
    end
  end
end
for _, pair in ipairs(memo_out) do out[#out + 1] = redis.call('HGETALL', jk(pair[1])) end
if rid ~= '' then redis.call('SET', memo, cjson.encode(memo_out), 'PX', 60000) end
if failed > 0 then redis.call('PUBLISH', P .. 'done', '') end
return out
"""
)

# ARGV: lease, then id, owner, token for each claim. Answers per claim:
# 0 lost, 1 kept, 2 kept with a cancel requested.
RENEW = (
    _LIB
    + r"""
local lease = tonumber(ARGV[1])
local t = now()
local out = {}
for i = 2, #ARGV, 3 do
  local id, owner, token = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local h = held(id, owner, token)
  if h then
    redis.call('HSET', jk(id), 'lease_until', num(t + lease))
    redis.call('ZADD', P .. 'l:' .. h.queue, t + lease, id)
    if h.sid then redis.call('XCLAIM', P .. 'q:' .. h.queue, 'g', owner, 0, h.sid, 'JUSTID') end
    out[#out + 1] = (h.cancel_requested == '1') and 2 or 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

# ARGV: ttl, then JSON [[id, owner, token, status, result|null, error|null], ...].
# Answers 1 (finished, or already finished so by this same claim) or 0 per one.
FINISH = (
    _LIB
    + r"""
local ttl = tonumber(ARGV[1])
local t = nil
local out = {}
for i, c in ipairs(cjson.decode(ARGV[2])) do
  local id, owner, token, status, result, err = c[1], c[2], c[3], c[4], val(c[5]), val(c[6])
  local h, seen = held(id, owner, token)
  if h then
    t = t or now()
    unheld(id, h)
    local set, del = {}, {}
    for _, f in ipairs({{'result_json', result}, {'error', err}}) do
      if f[2] then
        set[#set + 1] = f[1]
        set[#set + 1] = f[2]
      else
        del[#del + 1] = f[1]
      end
    end
    ended(id, h, 'running', status, t, ttl, set, del)
    out[i] = 1
  elseif seen.owner == owner and seen.token == token and seen.status == status
      and seen.result_json == (result or nil) and seen.error == (err or nil) then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)

# A retry (ARGV[2] = 'retry', with run_at and error) or a release ('release')
# of the claims ARGV[4..] (id, owner, token each); ARGV[1] the ttl, ARGV[3]
# the sender. A job whose cancel was requested ends cancelled instead.
# Answers per claim: 'pending', 'cancelled', or 0 when it was not held; a
# claim handed back already by this same call answers as it did.
HAND_BACK = (
    _LIB
    + r"""
local ttl, kind, sender = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local run_at, err, first = nil, nil, 4
if kind == 'retry' then
  run_at, err, first = ARGV[4], cjson.decode(ARGV[5]), 6
  err = val(err)
end
local t = now()
local out = {}
local woke, done = false, false
for i = first, #ARGV, 3 do
  local id, owner, token = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local h, seen = held(id, owner, token)
  local key = jk(id)
  if h then
    unheld(id, h)
    if h.cancel_requested == '1' then
      ended(id, h, 'running', 'cancelled', t, ttl)
      out[#out + 1] = 'cancelled'
      done = true
    else
      redis.call('HDEL', key, 'owner', 'started_at', 'lease_until')
      redis.call('HSET', key, 'hb', owner)
      if kind == 'retry' then
        redis.call('HSET', key, 'run_at', run_at)
        put(key, 'error', err)
      else
        redis.call('HINCRBY', key, 'attempts', -1)
      end
      moved(h, 'running', 'pending')
      local due = tonumber(redis.call('HGET', key, 'run_at') or h.created_at)
      queued(id, h, due)
      out[#out + 1] = 'pending'
      woke = true
    end
  elseif seen.token == token and ((seen.status == 'pending' and seen.hb == owner)
      or (seen.status == 'cancelled' and seen.owner == owner and seen.cancel_requested == '1')) then
    out[#out + 1] = seen.status
  else
    out[#out + 1] = 0
  end
end
if woke then redis.call('PUBLISH', P .. 'work', sender) end
if done then redis.call('PUBLISH', P .. 'done', '') end
return out
"""
)

# ARGV: id, owner, token, then JSON [done, total|null, message|null].
PROGRESS = (
    _LIB
    + r"""
local h = held(ARGV[1], ARGV[2], ARGV[3])
if not h then return 0 end
local p = cjson.decode(ARGV[4])
local key = jk(ARGV[1])
redis.call('HSET', key, 'progress_done', p[1])
for i, name in ipairs({'progress_total', 'progress_message'}) do
  put(key, name, val(p[i + 1]))
end
return 1
"""
)

# ARGV: id, ttl. Answers the job's status before (false when unknown).
CANCEL = (
    _LIB
    + r"""
local id, ttl = ARGV[1], tonumber(ARGV[2])
local h = fields(jk(id), HELD)
if not h.status then return false end
if h.status == 'pending' then
  local rm = redis.call('HGET', jk(id), 'rm')
  if rm then redis.call('ZREM', P .. 'r:' .. h.queue, rm) end
  ended(id, h, 'pending', 'cancelled', now(), ttl)
  redis.call('PUBLISH', P .. 'done', '')
elseif h.status == 'running' then
  redis.call('HSET', jk(id), 'cancel_requested', '1')
  redis.call('PUBLISH', P .. 'cancel', id)
end
return h.status
"""
)

# ARGV: finished before, at most how many. Answers how many were forgotten.
EXPIRE = (
    _LIB
    + r"""
local gone = redis.call('ZRANGEBYSCORE', P .. 'fin', '-inf', '(' .. ARGV[1],
  'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(gone) do
  local e = cjson.decode(member)
  local m, status, task, queue = e[1], e[2], e[3], e[4]
  local id = string.sub(m, 17)
  -- Only when the hash is still this final record (an id can be enqueued anew).
  if redis.call('HGET', jk(id), 'm') == m then redis.call('DEL', jk(id)) end
  redis.call('ZREM', P .. 'x', m)
  redis.call('ZREM', P .. 'xt:' .. task, m)
  moved({m = m, task = task, queue = queue}, status, nil)
  redis.call('ZREM', P .. 'fin', member)
end
return #gone
"""
)

# ARGV: offset, limit, task ('' for any), then the statuses (none for any).
# Answers {total, hash, hash, ...} newest first.
QUERY = (
    _LIB
    + r"""
local offset, limit, task = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local base = (task == '') and (P .. 'x') or (P .. 'xt:' .. task)
local source = base
local temp = nil
if #ARGV == 4 then
  source = base .. ':' .. ARGV[4]
elseif #ARGV > 4 then
  local sets = {}
  for i = 4, #ARGV do sets[#sets + 1] = base .. ':' .. ARGV[i] end
  temp = P .. 'tmp:query'
  redis.call('ZUNIONSTORE', temp, #sets, unpack(sets))
  source = temp
end
local total = redis.call('ZCARD', source)
local out = {total}
if limit > 0 then
  for _, m in ipairs(redis.call('ZREVRANGE', source, offset, offset + limit - 1)) do
    local h = redis.call('HGETALL', jk(string.sub(m, 17)))
    if #h > 0 then out[#out + 1] = h end
  end
end
if temp then redis.call('DEL', temp) end
return out
"""
)

# ARGV: name, owner, ttl. Answers {owner, epoch, expires_at} or false.
ACQUIRE = (
    _LIB
    + r"""
local name, owner, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lock = redis.call('GET', P .. 'lk:' .. name)
if lock then
  local sep = string.find(lock, '\0', 1, true)
  if string.sub(lock, 1, sep - 1) ~= owner then return false end
  return {owner, string.sub(lock, sep + 1), redis.call('HGET', P .. 'lr:' .. name, 'expires_at')}
end
local epoch = redis.call('INCR', P .. 'le:' .. name)
local t = now()
redis.call('SET', P .. 'lk:' .. name, owner .. '\0' .. epoch, 'PX', math.ceil(ttl * 1000))
redis.call('HSET', P .. 'lr:' .. name, 'owner', owner, 'epoch', epoch, 'expires_at', num(t + ttl))
redis.call('SADD', P .. 'ln', name)
return {owner, tostring(epoch), num(t + ttl)}
"""
)

# ARGV: name, owner, epoch, ttl. Answers the new expiry, or false.
RENEW_LEASE = (
    _LIB
    + r"""
local name, owner, epoch, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('GET', P .. 'lk:' .. name) ~= owner .. '\0' .. epoch then return false end
local t = now()
redis.call('SET', P .. 'lk:' .. name, owner .. '\0' .. epoch, 'PX', math.ceil(ttl * 1000))
redis.call('HSET', P .. 'lr:' .. name, 'expires_at', num(t + ttl))
return num(t + ttl)
"""
)

# ARGV: name, owner, epoch. Answers 1 when it was held live.
RELEASE_LEASE = (
    _LIB
    + r"""
local name, owner, epoch = ARGV[1], ARGV[2], ARGV[3]
local row = P .. 'lr:' .. name
local live = redis.call('GET', P .. 'lk:' .. name) == owner .. '\0' .. epoch
if live then redis.call('DEL', P .. 'lk:' .. name) end
if redis.call('HGET', row, 'owner') == owner and redis.call('HGET', row, 'epoch') == epoch then
  redis.call('HDEL', row, 'owner', 'expires_at')
end
return live and 1 or 0
"""
)

# ARGV: name, owner, epoch, slot, how many slots to keep. Answers 1 once per slot.
SLOT = (
    _LIB
    + r"""
local name, owner, epoch = ARGV[1], ARGV[2], ARGV[3]
local slot, keep = tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('GET', P .. 'lk:' .. name) ~= owner .. '\0' .. epoch then return 0 end
local row = P .. 'lr:' .. name
local floor = redis.call('HGET', row, 'slot_floor')
if floor and slot <= tonumber(floor) then return 0 end
local slots = P .. 'sl:' .. name
if redis.call('ZADD', slots, 'NX', slot, ARGV[4]) == 0 then return 0 end
-- Past twice the memory, the oldest fold into the floor (no slot at or under it runs).
if redis.call('ZCARD', slots) > 2 * keep then
  local edge = redis.call('ZREVRANGE', slots, keep, keep, 'WITHSCORES')
  redis.call('HSET', row, 'slot_floor', edge[2])
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', edge[2])
end
return 1
"""
)

# ARGV: name, proposed. Answers the stored anchor.
ANCHOR = (
    _LIB
    + r"""
redis.call('SET', P .. 'an:' .. ARGV[1], ARGV[2], 'NX')
return redis.call('GET', P .. 'an:' .. ARGV[1])
"""
)

# Answers every lease row: {name, owner|'', epoch, expires_at|''} ...
LEASES = (
    _LIB
    + r"""
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', P .. 'ln')) do
  local row = redis.call('HMGET', P .. 'lr:' .. name, 'owner', 'epoch', 'expires_at')
  if row[2] then out[#out + 1] = {name, row[1] or '', row[2], row[3] or ''} end
end
return out
"""
)

# ARGV: forget after, id, host, pid, started_at, running, lag|''.
HEARTBEAT = (
    _LIB
    + r"""
local forget, id = tonumber(ARGV[1]), ARGV[2]
local t = now()
for _, other in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nds', '-inf', '(' .. num(t - forget))) do
  if other ~= id then
    redis.call('DEL', P .. 'nd:' .. other)
    redis.call('ZREM', P .. 'nds', other)
  end
end
local key = P .. 'nd:' .. id
redis.call('HSET', key, 'host', ARGV[3], 'pid', ARGV[4], 'started_at', ARGV[5],
  'running', ARGV[6], 'last_seen', num(t), 'beat', redis.call('INCR', P .. 'beats'))
put(key, 'lag', ARGV[7] ~= '' and ARGV[7] or nil)
redis.call('ZADD', P .. 'nds', t, id)
return 1
"""
)

# ARGV: id.
FORGET_NODE = (
    _LIB
    + r"""
redis.call('DEL', P .. 'nd:' .. ARGV[1])
redis.call('ZREM', P .. 'nds', ARGV[1])
return 1
"""
)

# Answers {id, hash} for every node.
NODES = (
    _LIB
    + r"""
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'nds', 0, -1)) do
  local h = redis.call('HGETALL', P .. 'nd:' .. id)
  if #h > 0 then out[#out + 1] = {id, h} end
end
return out
"""
)
