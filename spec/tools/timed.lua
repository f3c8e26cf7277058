-- A busted output handler (busted -o spec/tools/timed.lua): the usual
-- terminal output (the handler busted would have picked), and, when
-- LBATCH_TIMES names a file, one line per spec file and per test appended
-- to it with its seconds, for spec/tools/slowest:
--   file<TAB>SECONDS<TAB>spec/x_spec.lua
--   test<TAB>SECONDS<TAB>spec/x_spec.lua:LINE<TAB>full name
-- Each line is flushed at once: a process that LeakSanitizer ends with
-- _exit keeps what it wrote.
return function(options)
  local busted = require 'busted'
  local terminal = require('busted.outputHandlers.' .. (options.defaultOutput or 'plainTerminal'))(options)
  local path = os.getenv('LBATCH_TIMES')
  if not path or path == '' then return terminal end
  local out = io.open(path, 'a')
  if not out then return terminal end
  local function put(...)
    out:write(table.concat({ ... }, '\t'), '\n')
    out:flush()
  end
  local function secs(element) return ('%.3f'):format(element.duration or 0) end
  busted.subscribe({ 'file', 'end' }, function(file)
    put('file', secs(file), file.name)
    return nil, true
  end)
  busted.subscribe({ 'test', 'end' }, function(test)
    local trace = test.trace or {}
    local name = terminal.getFullName(test):gsub('[\t\n]', ' ')
    put('test', secs(test), ('%s:%s'):format(trace.short_src or '?', trace.currentline or '?'), name)
    return nil, true
  end)
  -- closed before the process ends, its last line flushed
  busted.subscribe({ 'exit' }, function()
    out:close()
    return nil, true
  end)
  return terminal
end
